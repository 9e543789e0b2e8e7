"""Compare in XYZ: set txt2img's X/Y/Z plot to a Checkpoint name axis over A, B and this session's merges of
A and B (e.g. 2B − A and the re-basin result), then switch to txt2img.

The axis uses the webui's own "Checkpoint name" option, whose values are the registry's titles.  We set the
script dropdown, the X type, the X values text (what X/Y/Z reads in CSV mode and moves into its dropdown when
the X type changes) and the X values dropdown (what it reads otherwise), so the result is the same whichever
state the plot was in.
"""
from __future__ import annotations

from typing import Sequence

import gradio as gr

from ..host.base import Host
from .compat import js

CHECKPOINT_AXIS = "Checkpoint name"


def model_paths(host: Host, names: Sequence[str | None]) -> list[str | None]:
    paths = []
    for name in names:
        try:
            paths.append(host.checkpoint_path(name) if name else None)
        except ValueError:
            paths.append(None)
    return paths


def axis_titles(host: Host, model_a: str | None, model_b: str | None, history: list[dict]) -> list[str]:
    """A, B, then every result this session merged from exactly A and B, as Checkpoint-name axis values."""
    a, b = model_paths(host, [model_a, model_b])
    paths = [p for p in (a, b) if p]
    paths += [entry["result"] for entry in history if entry["models"] == [a, b] and a and b]
    titles = []
    for path in paths:
        title = host.xyz_title_for_path(path)
        if title and title not in titles:
            titles.append(title)
    return titles


def attach_compare(host: Host, button: gr.Button, model_a, model_b, history) -> bool:
    """Wire the button to txt2img's X/Y/Z plot; False (nothing wired) when the host has no such plot."""
    targets = host.xyz_targets()
    if targets is None:
        return False

    def compare(a: str | None, b: str | None, session: list | None) -> list:
        titles = axis_titles(host, a, b, session or [])
        if not titles:
            raise gr.Error("Choose models A and B first")
        return [gr.update(value=targets.script_title), gr.update(value=CHECKPOINT_AXIS),
                gr.update(value=", ".join(titles)),
                gr.update(choices=host.xyz_checkpoint_choices(), value=titles, visible=True)]

    button.click(compare, inputs=[model_a, model_b, history],
                 outputs=[targets.script_dropdown, targets.x_type, targets.x_values, targets.x_values_dropdown]) \
        .then(None, **js("rebasinShowTxt2img"))
    return True
