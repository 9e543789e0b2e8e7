"""What the webui's callbacks call (scripts/rebasin_merge.py only wires these): the tab, the settings section,
the REST routes."""
from __future__ import annotations

import gradio as gr

from ..host.base import DTYPE_CHOICES, Host, Settings

TAB_TITLE = "Re-Basin Merge"
TAB_ID = "rebasin"


def ui_tabs(host: Host) -> list[tuple[gr.Blocks, str, str]]:
    from .tab import build_tab
    return [(build_tab(host), TAB_TITLE, TAB_ID)]


def ui_settings(host) -> None:
    """Settings > Re-Basin Merge: default output dtype, device, permutation cache folder and its size limit."""
    host.register_settings([
        ("rebasin_dtype", "fp16", "Default output dtype", gr.Radio, {"choices": list(DTYPE_CHOICES)},
         "'same' keeps each tensor's dtype from model A"),
        ("rebasin_device", "default", "Device for merging and weight matching", gr.Dropdown,
         lambda: {"choices": ["default", *host.device_choices()]}, "default: the webui's device"),
        ("rebasin_permutation_cache", "", "Permutation cache folder", None, None,
         f"where re-basin permutations are kept for reuse; empty: {host.default_permutation_cache_dir()}"),
        ("rebasin_permutation_cache_limit_mb", Settings.permutation_cache_limit_mb,
         "Permutation cache size limit (MB)", gr.Number, {"precision": 0, "minimum": 0},
         "the least recently used files go first; 0: no limit"),
    ])


def app_started(host: Host, app) -> None:
    """Mount the REST routes when the webui serves its API (--api or --nowebui)."""
    if host.api_enabled():
        from . import api
        api.mount(app, host)
