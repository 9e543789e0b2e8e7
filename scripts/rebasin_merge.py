"""Re-Basin Merge for AUTOMATIC1111 / Forge: wires the webui's callbacks to lib_rebasin (no logic here)."""
from modules import script_callbacks

from lib_rebasin.host import webui_host
from lib_rebasin.ui import webui

host = webui_host()

script_callbacks.on_ui_settings(lambda: webui.ui_settings(host))
script_callbacks.on_ui_tabs(lambda: webui.ui_tabs(host))
script_callbacks.on_app_started(lambda demo, app: webui.app_started(host, app))
