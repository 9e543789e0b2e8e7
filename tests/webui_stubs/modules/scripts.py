"""modules/scripts.py: Script and ScriptRunner as far as the X/Y/Z plot's UI goes: `inputs[0]` is the script
dropdown, each script's controls are `inputs[args_from:args_to]`; `scripts_txt2img` is set when txt2img is built."""
import os


class Script:
    filename = None
    args_from = None
    args_to = None
    group = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def elem_id(self, item_id):
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_{title}_{item_id}"


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.titles = []
        self.inputs = [None]

    def setup_ui(self, gr):
        """Build the Script dropdown and each selectable script's controls (the caller is inside a Blocks)."""
        self.titles = [s.title() for s in self.selectable_scripts]
        self.inputs[0] = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles,
                                     value="None", type="index")
        for script in self.selectable_scripts:
            script.args_from = len(self.inputs)
            with gr.Group(visible=False) as group:
                controls = script.ui(script.is_img2img) or []
            script.group = group
            self.inputs += list(controls)
            script.args_to = len(self.inputs)
        return self.inputs

    def add(self, script, filename):
        script.filename = os.path.abspath(filename)
        script.is_img2img = False
        self.scripts.append(script)
        self.selectable_scripts.append(script)


scripts_txt2img: ScriptRunner = None
scripts_img2img: ScriptRunner = None
