"""What the webui's callbacks call (scripts/rebasin_merge.py only wires these): the tab, the settings section,
the REST routes."""
from __future__ import annotations

import gradio as gr

from ..host.base import DTYPE_CHOICES, Host

TAB_TITLE = "Re-Basin Merge"
TAB_ID = "rebasin"


def ui_tabs(host: Host) -> list[tuple[gr.Blocks, str, str]]:
    from .tab import build_tab
    return [(build_tab(host), TAB_TITLE, TAB_ID)]


def ui_settings(host) -> None:
    """Settings > Re-Basin Merge: default output dtype, device, permutation cache folder."""
    host.register_settings([
        ("rebasin_dtype", "fp16", "Default output dtype", gr.Radio, {"choices": list(DTYPE_CHOICES)},
         "'same' keeps each tensor's dtype from model A"),
        ("rebasin_device", "default", "Device for merging and weight matching", gr.Dropdown,
         lambda: {"choices": ["default", *host.device_choices()]}, "default: the webui's device"),
        ("rebasin_permutation_cache", "", "Permutation cache folder", None, None,
         "where re-basin permutations are kept for reuse; empty: beside each merged checkpoint"),
    ])


def app_started(host: Host, app) -> None:
    """Mount the REST routes when the webui serves its API (--api or --nowebui)."""
    if host.api_enabled():
        from . import api
        api.mount(app, host)
