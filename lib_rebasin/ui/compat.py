"""The few places where Gradio 3.41 (A1111), 4.40 (Forge) and current Gradio differ for this tab."""
from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js(code: str) -> dict:
    """Event keyword for a JavaScript function: `_js=` in Gradio 3 (Forge maps it, plain Gradio 4+ wants `js=`)."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def hidden_progress() -> dict:
    """Event keyword that keeps Gradio's loading overlay off an output (all three versions accept 'hidden')."""
    return {"show_progress": "hidden"}
