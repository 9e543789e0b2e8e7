// Re-Basin Merge tab: the parts that need the browser (the webui's checkpoint selector, its tabs).
// Loaded by A1111 and Forge from javascript/, and put in the page head by the standalone app.

function rebasinRoot() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

function rebasinClick(id) {
    var element = rebasinRoot().querySelector("#" + id);
    if (element) {
        element.click();
    }
    return Boolean(element);
}

// The lists follow the models folder: rescanned when the page loads and whenever the tab is shown (the webui
// builds the page once, so a browser reload alone would show the lists of that moment).
function rebasinRefreshLists() {
    rebasinClick("rebasin_refresh");
}

if (typeof onUiLoaded === "function") {
    onUiLoaded(rebasinRefreshLists);
}

if (typeof onUiTabChange === "function") {
    onUiTabChange(function() {
        var current = typeof get_uiCurrentTabContent === "function" ? get_uiCurrentTabContent() : null;
        if (current && current.id === "tab_rebasin") {
            rebasinRefreshLists();
        }
    });
}

// After a merge: refresh the webui's own checkpoint dropdown (A1111's quicksettings, Forge's checkpoint manager).
function rebasinAfterMerge() {
    if (!rebasinClick("refresh_sd_model_checkpoint")) {
        rebasinClick("forge_refresh_checkpoint");
    }
    return [];
}

// Load: switch the webui to the new checkpoint through its own selector.
function rebasinLoadCheckpoint(name) {
    if (!name || typeof selectCheckpoint !== "function") {
        return [];
    }
    // Forge's selector (Gradio 4) only accepts names among its choices: refresh them first.
    if (rebasinClick("forge_refresh_checkpoint")) {
        setTimeout(function() {
            selectCheckpoint(name);
        }, 1000);
    } else {
        selectCheckpoint(name);
    }
    return [];
}

// Compare in XYZ: the X/Y/Z plot is set up; show txt2img.
function rebasinShowTxt2img() {
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return [];
}
