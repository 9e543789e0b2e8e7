"""modules/script_callbacks.py: registrars `on_X(callback, *, name=None)` and the calls the webui makes."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_ui_tabs": [], "callbacks_ui_settings": [], "callbacks_app_started": [],
                "callbacks_before_ui": []}


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    callbacks.append(ScriptCallback(filename or "unknown file", fun, name))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')


def ui_tabs_callback():
    res = []
    for c in callback_map['callbacks_ui_tabs']:
        res += c.callback() or []
    return res


def ui_settings_callback():
    for c in callback_map['callbacks_ui_settings']:
        c.callback()


def app_started_callback(demo, app):
    for c in callback_map['callbacks_app_started']:
        c.callback(demo, app)
