"""modules/paths.py: the models root (here a temporary folder set by the test fixture)."""
import os
import tempfile

models_path = os.environ.get("WEBUI_STUB_MODELS", os.path.join(tempfile.gettempdir(), "webui-stub-models"))
script_path = os.path.dirname(models_path)
