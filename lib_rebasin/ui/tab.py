"""The merge tab, built against a Host: the same Blocks inside A1111 (Gradio 3.41), Forge (4.40) and the
standalone app (current Gradio).

A merge is two events: the merge itself (through the host's job wrapper, with Gradio's progress on the result
box), then a quick one that refreshes the model lists and shows Load / Compare in XYZ.  `TabActions` holds the
handlers as plain methods, so tests call them without a browser.
"""
from __future__ import annotations

import html
import time
from typing import Callable, Sequence

import gradio as gr

from .. import jobs
from ..anatomy import COMPONENT_LABELS, COMPONENTS, ArchitectureError
from ..layout import CLIP_G, CLIP_L, UNET, VAE
from ..checkpoint import CheckpointError
from ..host.base import DTYPE_CHOICES, Host
from ..merge import DEFAULT_COMPONENTS
from ..permcache import cache_usage, clear_cache
from ..progress import Cancelled
from . import forms, xyz
from .compat import hidden_progress, js

SOURCE_LABELS = {"merge": "merge", "a": "A", "b": "B"}  # radio choice per component source
INTRO = ("<div class='rebasin-intro'>Pick a method and the models, then <b>Merge</b>. The result is written "
         "into the models folder and appears in every checkpoint list.</div>")
STARTING = ("<div class='rebasin-running'>Starting… (a generation or merge that is running in the webui "
            "finishes first)</div>")
LATE_INTERRUPT = ("Interrupt came too late to stop this merge: the file was already complete and being "
                  "written to disk, so it was kept.")
# Order of the values the merge handler receives (see TabActions.recipe).
RECIPE_FIELDS = ("method", "model_a", "model_b", "model_c", "models_many", "multiplier", "alpha", "seed",
                 *(f"source_{c}" for c in COMPONENTS), "vae", "dtype", "device", "output_name", "overwrite",
                 "compute", "clamp", "allow_nonfinite")
PROGRESS_LIMIT = 64  # characters of a progress description (the bar adds the percentage)
# a checkpoint key's prefix -> the component it belongs to, for progress text ("UNet middle_block.1…")
_KEY_PREFIXES = ((UNET, COMPONENT_LABELS["unet"]), (CLIP_L, COMPONENT_LABELS["clip_l"]),
                 (CLIP_G, COMPONENT_LABELS["clip_g"]), (VAE, COMPONENT_LABELS["vae"]))


def progress_text(message: str, limit: int = PROGRESS_LIMIT) -> str:
    """A progress message that fits the bar: its phase kept in front, a checkpoint key named by its component,
    cut from the right.  The streamed merge reports bare keys: their phase is 'writing'."""
    phase, sep, detail = message.partition(": ")
    if not sep:
        phase, detail = ("writing", message) if _component_key(message) != message else (message, "")
    text = f"{phase}: {_component_key(detail)}" if detail else phase
    return text if len(text) <= limit else text[:limit - 1].rstrip(" .:") + "…"


def _component_key(key: str) -> str:
    for prefix, label in _KEY_PREFIXES:
        if key.startswith(prefix):
            return f"{label} {key[len(prefix):]}"
    return key


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds / 5) * 5):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


class ThrottledProgress:
    """Forwards progress at most every `interval` seconds (and always the end), for Gradio's progress bar, with
    a time-left estimate from this job's own pace (Gradio's own ETA is the average of earlier, different jobs,
    so the tab hides it)."""

    def __init__(self, target: Callable[..., object], interval: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.target = target
        self.interval = interval
        self.clock = clock
        self._start = clock()
        self._last = float("-inf")
        self.fraction = 0.0

    def say(self, message: str) -> None:
        """A message between the job's own reports (e.g. the host making room): shown at once."""
        self.target(self.fraction, desc=progress_text(message))

    def __call__(self, fraction: float, message: str) -> None:
        now = self.clock()
        self.fraction = fraction
        if fraction >= 1.0 or now - self._last >= self.interval:
            self._last = now
            text = progress_text(message)
            elapsed = now - self._start
            if 0.02 <= fraction < 1.0 and elapsed >= 5:
                text += f" · about {_duration(elapsed * (1 - fraction) / fraction)} left"
            self.target(fraction, desc=text)


class TabActions:
    """The tab's handlers; each returns plain values or gr.update()s in the order of its outputs."""

    def __init__(self, host: Host):
        self.host = host

    # --- reading the form --------------------------------------------------------------------------------------
    def recipe(self, values: Sequence) -> forms.Recipe:
        v = dict(zip(RECIPE_FIELDS, values))
        method = forms.method_key(v["method"])
        return forms.Recipe(
            method=method,
            models=forms.models_for(method, v["model_a"], v["model_b"], v["model_c"], v["models_many"]),
            multiplier=v["multiplier"], alpha=v["alpha"], seed=v["seed"],
            components={c: str(v[f"source_{c}"]).lower() for c in COMPONENTS},
            vae=v["vae"] or "", dtype=v["dtype"], device=v["device"], output_name=v["output_name"] or "",
            overwrite=bool(v["overwrite"]), compute=v["compute"], clamp=bool(v["clamp"]),
            allow_nonfinite=bool(v["allow_nonfinite"]))

    # --- live form updates -------------------------------------------------------------------------------------
    def method_changed(self, method: str) -> list:
        """Show the model fields and numbers the method uses."""
        info = jobs.METHODS[forms.method_key(method)]
        many = info.n_models is None
        return [gr.update(visible=not many), gr.update(visible=not many),
                gr.update(visible=info.n_models == 3), gr.update(visible=many),
                gr.update(visible=info.uses_multiplier), gr.update(visible=info.uses_alpha),
                gr.update(visible=info.uses_seed)]

    def preview(self, *values) -> list:
        """The formula with the current numbers and the name the output gets if the field stays empty."""
        recipe = self.recipe(values)
        info = jobs.METHODS[recipe.method]
        formula = forms.formula_text(recipe.method, recipe.multiplier, recipe.alpha)
        names = [f"<span><b>{letter}</b> {html.escape(name)}</span>"
                 for letter, name in zip("ABC" if info.n_models else "123456789", recipe.models) if name]
        suggested = forms.suggested_name(self.host, recipe)
        target = (f"<div class='rebasin-formula-target'>→ {html.escape(suggested)}</div>"
                  if suggested and not recipe.output_name.strip() else "")
        card = (f"<div class='rebasin-formula'><div class='rebasin-formula-math'>{html.escape(formula)}</div>"
                f"<div class='rebasin-formula-models'>{''.join(names)}</div>{target}</div>")
        return [card, gr.update(placeholder=suggested or "name of the new checkpoint")]

    def refresh(self, *current) -> list:
        """Rescan the models folder: the lists, the VAE list, the empty-folder hint, the cache line.  Given the
        lists' current values (A, B, C, MergeMany), each is kept as what the host calls that file now (A1111
        titles gain a ' [hash]' once the webui hashes a file), or cleared if the file is gone."""
        self.host.refresh_checkpoints()
        titles = self.host.checkpoint_titles()
        return self._lists(titles, current) + [
            gr.update(choices=[forms.NO_VAE, *self.host.vae_files()]),
            gr.update(visible=not titles), self.cache_info()]

    def _lists(self, titles: list[str], current: Sequence) -> list:
        if not current:
            return [gr.update(choices=titles) for _ in range(4)]
        a, b, c, many = (list(current) + [None] * 4)[:4]
        return [*(gr.update(choices=titles, value=self._current_title(v)) for v in (a, b, c)),
                gr.update(choices=titles, value=[t for t in map(self._current_title, many or []) if t])]

    def _current_title(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            return self.host.title_for_path(self.host.checkpoint_path(value))
        except ValueError:
            return None

    def cache_info(self) -> str:
        """One line on the permutation cache: where, how big, its cap."""
        folder = self.host.permutation_cache_dir()
        count, size = cache_usage(folder)
        limit = self.host.permutation_cache_limit()
        cap = f" of {forms.human_bytes(limit)}" if limit else ""
        return (f"<div class='rebasin-cache-info'>Permutation cache: {count} file{'s' if count != 1 else ''}, "
                f"{forms.human_bytes(size)}{cap} in <code>{html.escape(folder)}</code></div>")

    def clear_cache(self) -> str:
        removed = clear_cache(self.host.permutation_cache_dir())
        return self.cache_info() + (f"<div class='rebasin-cache-info'>Removed {removed} file"
                                    f"{'s' if removed != 1 else ''}.</div>")

    # --- the merge ---------------------------------------------------------------------------------------------
    def merge(self, values: Sequence, progress: Callable[..., object] | None = None) -> list:
        """Run one merge; returns [result path or None, result HTML]."""
        try:
            request = forms.build_request(self.host, self.recipe(values))
        except ValueError as e:
            return [None, forms.error_html(e)]
        on_progress = ThrottledProgress(progress) if progress is not None else None
        notes: list[str] = []
        try:
            with self.host.job_room(request, on_progress.say if on_progress else lambda text: None) as notes:
                result = jobs.run(request, self.host.monitor(on_progress))
                if self.host.interrupted():  # asked after the last point where the job could stop
                    notes.insert(0, LATE_INTERRUPT)
        except Cancelled:
            return [None, forms.message_html("cancelled", "Interrupted: no file was written.") + _notes_html(notes)]
        except (ValueError, CheckpointError, ArchitectureError) as e:
            return [None, forms.error_html(e) + _notes_html(notes)]
        self.host.refresh_checkpoints()
        return [result.path, _notes_html(notes[:1] if notes[:1] == [LATE_INTERRUPT] else [])
                + forms.result_html(result, self.host.models_dir())
                + _notes_html([n for n in notes if n != LATE_INTERRUPT])]

    def starting(self) -> list:
        """Before a job: an empty result box (Gradio's progress bar has it to itself), no Load / Compare (they
        would point at the previous result)."""
        return [STARTING, gr.update(visible=False), gr.update(visible=False)]

    def after_merge(self, result_path: str | None, history: list | None, *models) -> list:
        """Refresh the lists; offer Load and Compare for a new result only; remember it for the XYZ comparison.
        `models`: the values of A, B, C and MergeMany."""
        titles = self.host.checkpoint_titles()
        lists = self._lists(titles, models)
        history = list(history or [])
        if not result_path:
            return lists + [gr.update(visible=False), gr.update(visible=False), "", history, self.cache_info()]
        load_value = self.host.load_value(result_path) or ""
        history.append({"models": xyz.model_paths(self.host, models[:2]), "result": result_path})
        return lists + [gr.update(visible=self.host.can_load and bool(load_value), value=f"Load {load_value}"),
                        gr.update(visible=self.host.xyz_targets() is not None), load_value, history,
                        self.cache_info()]

    def interrupt(self) -> None:
        self.host.interrupt()

    def create_samples(self, progress: Callable[..., object] | None = None) -> list:
        """Standalone, empty folder: write two synthetic checkpoints; returns [their paths, message HTML]."""
        on_progress = ThrottledProgress(progress) if progress is not None else None
        try:
            paths = self.host.create_samples(monitor=self.host.monitor(on_progress))
        except Cancelled:
            return [[], forms.message_html("cancelled", "Interrupted: no file was written.")]
        first, second = (self.host.title_for_path(p) for p in paths)
        return [paths, forms.message_html("info", f"Created {first} and {second}: they are selected as A and B. "
                                                  f"Pick a method and press Merge.")]

    def after_samples(self, paths: list | None) -> list:
        """Select the new checkpoints as A and B (and as the models of MergeMany)."""
        titles = self.host.checkpoint_titles()
        if not paths:
            return [gr.update(choices=titles) for _ in range(4)] + [gr.update()]
        first, second = (self.host.title_for_path(p) for p in paths)
        return [gr.update(choices=titles, value=first), gr.update(choices=titles, value=second),
                gr.update(choices=titles), gr.update(choices=titles, value=[first, second]),
                gr.update(visible=False)]


def build_tab(host: Host) -> gr.Blocks:
    """The tab as its own Blocks (the webui renders it into a TabItem; the standalone app launches it)."""
    actions = TabActions(host)
    titles = host.checkpoint_titles()
    labels = [info.label for info in jobs.METHODS.values()]
    first = jobs.METHODS[next(iter(jobs.METHODS))]
    defaults = dict(method=first.label, model_a=None, model_b=None, model_c=None, models_many=[], multiplier=2.0,
                    alpha=0.5, seed=0, vae=forms.NO_VAE, dtype=host.settings().dtype, device=host.resolve_device(""),
                    output_name="", overwrite=False, compute="fp32", clamp=False, allow_nonfinite=False,
                    **{f"source_{c}": SOURCE_LABELS[DEFAULT_COMPONENTS[c]] for c in COMPONENTS})
    initial_formula = actions.preview(*(defaults[name] for name in RECIPE_FIELDS))[0]
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(elem_id="rebasin_tab", equal_height=False):
            with gr.Column(scale=3, elem_classes=["rebasin-recipe"]):
                with gr.Column(visible=not titles, elem_id="rebasin_samples",
                               elem_classes=["rebasin-samples"]) as samples:
                    gr.HTML(_empty_folder_html(host))
                    samples_button = gr.Button("Create two synthetic SDXL checkpoints", variant="primary",
                                               elem_id="rebasin_create_samples", visible=host.can_create_samples)
                method = gr.Radio(labels, value=first.label, label="Method", elem_id="rebasin_method")
                formula = gr.HTML(initial_formula, elem_id="rebasin_formula")
                with gr.Row(elem_classes=["rebasin-models"]):
                    model_a = gr.Dropdown(titles, value=None, label="Model A", elem_id="rebasin_model_a")
                    model_b = gr.Dropdown(titles, value=None, label="Model B", elem_id="rebasin_model_b")
                    model_c = gr.Dropdown(titles, value=None, label="Model C", elem_id="rebasin_model_c",
                                          visible=first.n_models == 3)
                    models_many = gr.Dropdown(titles, value=[], label="Models", multiselect=True,
                                              elem_id="rebasin_models", visible=first.n_models is None)
                    refresh = gr.Button("\u21bb", elem_id="rebasin_refresh", elem_classes=["tool", "rebasin-tool"])
                with gr.Row(elem_classes=["rebasin-numbers"]):
                    multiplier = gr.Slider(-2.0, 6.0, value=defaults["multiplier"], step=0.05, label="Multiplier M",
                                           elem_id="rebasin_multiplier", visible=first.uses_multiplier)
                    alpha = gr.Slider(0.0, 1.0, value=defaults["alpha"], step=0.01, label="Alpha α",
                                      elem_id="rebasin_alpha", visible=first.uses_alpha)
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="rebasin_seed",
                                     visible=first.uses_seed)
                with gr.Accordion("Components, VAE, precision and device", open=False, elem_id="rebasin_options"):
                    def source(component: str) -> gr.Radio:
                        return gr.Radio(list(SOURCE_LABELS.values()), value=defaults[f"source_{component}"],
                                        label=COMPONENT_LABELS[component], elem_id=f"rebasin_source_{component}")

                    with gr.Row(elem_classes=["rebasin-sources"]):
                        sources = {c: source(c) for c in ("unet", "clip_l", "clip_g")}
                    with gr.Row(elem_classes=["rebasin-sources"]):
                        sources.update((c, source(c)) for c in ("vae", "other"))
                        vae = gr.Dropdown([forms.NO_VAE, *host.vae_files()], value=forms.NO_VAE,
                                          label="Bake in VAE", elem_id="rebasin_vae")
                    with gr.Row():
                        dtype = gr.Radio(list(DTYPE_CHOICES), value=defaults["dtype"], label="Output dtype",
                                         elem_id="rebasin_dtype")
                        compute = gr.Radio(list(forms.COMPUTE_CHOICES), value="fp32", label="Compute in",
                                           elem_id="rebasin_compute")
                        device = gr.Dropdown(host.device_choices(), value=defaults["device"], label="Device",
                                             elem_id="rebasin_device")
                    with gr.Row():
                        clamp = gr.Checkbox(False, label="Clamp to the inputs' range", elem_id="rebasin_clamp")
                        allow_nonfinite = gr.Checkbox(False, label="Allow NaN / Inf in the output",
                                                      elem_id="rebasin_allow_nonfinite")
                    with gr.Row(elem_classes=["rebasin-cache"]):
                        cache_info = gr.HTML(actions.cache_info(), elem_id="rebasin_cache_info")
                        cache_clear = gr.Button("Clear the cache", elem_id="rebasin_cache_clear", size="sm",
                                                scale=0, min_width=140)
                with gr.Row(elem_classes=["rebasin-output"]):
                    output_name = gr.Textbox(label="Output name", placeholder="name of the new checkpoint",
                                             max_lines=1, elem_id="rebasin_output_name", scale=4)
                    overwrite = gr.Checkbox(False, label="Overwrite if it exists", elem_id="rebasin_overwrite",
                                            scale=1)
                with gr.Row(elem_classes=["rebasin-actions"]):
                    merge_button = gr.Button("Merge", variant="primary", elem_id="rebasin_merge")
                    interrupt_button = gr.Button("Interrupt", elem_id="rebasin_interrupt")
            with gr.Column(scale=2, elem_classes=["rebasin-result-column"]):
                result = gr.HTML(INTRO, elem_id="rebasin_result")
                with gr.Row(elem_classes=["rebasin-result-actions"]):
                    load_button = gr.Button("Load", visible=False, elem_id="rebasin_load")
                    xyz_button = gr.Button("Compare in XYZ", visible=False, elem_id="rebasin_xyz")
                load_value = gr.Textbox(visible=False, elem_id="rebasin_load_value")
        result_path = gr.State(None)
        history = gr.State([])

        lists = [model_a, model_b, model_c, models_many]
        recipe_inputs = [method, *lists, multiplier, alpha, seed, *(sources[c] for c in COMPONENTS), vae, dtype, device,
                         output_name, overwrite, compute, clamp, allow_nonfinite]

        method.change(actions.method_changed, inputs=[method],
                      outputs=[model_a, model_b, model_c, models_many, multiplier, alpha, seed], **hidden_progress())
        for component in [method, *lists, multiplier, alpha, output_name]:
            component.change(actions.preview, inputs=recipe_inputs, outputs=[formula, output_name],
                             **hidden_progress())
        refresh_outputs = [*lists, vae, samples, cache_info]
        refresh.click(actions.refresh, inputs=lists, outputs=refresh_outputs, **hidden_progress())
        cache_clear.click(actions.clear_cache, outputs=[cache_info], **hidden_progress())

        merge_handler = _with_progress(host, actions.merge, "merge")
        merge_button.click(actions.starting, outputs=[result, load_button, xyz_button], **hidden_progress()) \
            .then(host.wrap_ui_job(merge_handler, extra_outputs=[None]), inputs=recipe_inputs,
                  outputs=[result_path, result]) \
            .then(actions.after_merge, inputs=[result_path, history, *lists],
                  outputs=[*lists, load_button, xyz_button, load_value, history, cache_info], **hidden_progress()) \
            .then(None, **js("rebasinAfterMerge"))
        interrupt_button.click(actions.interrupt, **hidden_progress())
        load_button.click(None, inputs=[load_value], **js("rebasinLoadCheckpoint"))
        xyz.attach_compare(host, xyz_button, model_a, model_b, history)

        if host.can_create_samples:
            created = gr.State([])
            samples_handler = _with_progress(host, lambda values, progress: actions.create_samples(progress),
                                             "create_samples")
            samples_button.click(actions.starting, outputs=[result, load_button, xyz_button],
                                 **hidden_progress()) \
                .then(host.wrap_ui_job(samples_handler, extra_outputs=[[]]), outputs=[created, result]) \
                .then(actions.after_samples, inputs=[created], outputs=[*lists, samples], **hidden_progress()) \
                .then(actions.preview, inputs=recipe_inputs, outputs=[formula, output_name], **hidden_progress())
    tab.rebasin_actions = actions
    tab.rebasin_refresh_outputs = refresh_outputs
    return tab


def _empty_folder_html(host: Host) -> str:
    folder = f"<code>{html.escape(host.models_dir())}</code>"
    if host.can_create_samples:
        return (f"<div class='rebasin-samples-text'><b>No checkpoints in {folder}.</b> Create two synthetic SDXL "
                f"checkpoints ({host.sample_scale} scale: a base and a fine-tune of it) to try every "
                f"method.</div>")
    return (f"<div class='rebasin-samples-text'><b>No checkpoints in {folder}.</b> Put SDXL checkpoints "
            f"(<code>.safetensors</code>) there, then press ↻ to list them.</div>")


def _notes_html(notes: Sequence[str]) -> str:
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"<ul class='rebasin-notes'>{items}</ul>" if items else ""


def _with_progress(host: Host, action: Callable[..., list], name: str) -> Callable[..., list]:
    """A Gradio handler named `name` for `action(values, progress)`: with gr.Progress where the queue allows it
    (Gradio finds the Progress parameter by its default, among the positional parameters before *values)."""
    if host.queue_enabled():
        def handler(progress=gr.Progress(), *values):
            return action(values, progress)
    else:
        def handler(*values):
            return action(values, None)
    handler.__name__ = handler.__qualname__ = name
    return handler
