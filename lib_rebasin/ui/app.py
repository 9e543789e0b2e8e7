"""The standalone app: the merge tab over a folder of checkpoints, with the REST routes, served by uvicorn.
Made for current Gradio (4.x and later)."""
from __future__ import annotations

import html
import inspect
import os

import gradio as gr

from .. import __version__
from ..host.standalone import StandaloneHost
from . import api
from .tab import build_tab

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TITLE = "Re-Basin Merge"


def _read(relative: str) -> str:
    with open(os.path.join(PROJECT_ROOT, relative), encoding="utf-8") as f:
        return f.read()


def page_assets() -> dict[str, str]:
    """The extension's own style.css and javascript/rebasin.js, which the webui would load by itself."""
    script = _read(os.path.join("javascript", "rebasin.js"))
    return {"css": _read("style.css"), "head": f"<script>\n{script}\n</script>"}


def build_app(host: StandaloneHost) -> gr.Blocks:
    tab = build_tab(host)
    blocks_kwargs = {} if "css" in inspect.signature(gr.mount_gradio_app).parameters else page_assets()
    with gr.Blocks(title=TITLE, analytics_enabled=False, **blocks_kwargs) as demo:
        gr.HTML(f"<div class='rebasin-header'><h1>{TITLE}</h1><span>v{__version__} · models in "
                f"<code>{html.escape(host.models_dir())}</code> · device <code>{html.escape(host.default_device())}"
                f"</code></span></div>", elem_id="rebasin_header")
        tab.render()
        demo.load(tab.rebasin_actions.refresh, outputs=tab.rebasin_refresh_outputs, show_progress="hidden")
    demo.rebasin_actions = tab.rebasin_actions
    return demo


def create_server_app(host: StandaloneHost):
    """A FastAPI app with the REST routes and the Gradio page mounted at /."""
    from fastapi import FastAPI
    app = FastAPI(title=TITLE)
    api.mount(app, host)
    demo = build_app(host)
    kwargs = page_assets() if "css" in inspect.signature(gr.mount_gradio_app).parameters else {}
    return gr.mount_gradio_app(app, demo.queue(), path="/", **kwargs)


def serve(host: StandaloneHost, *, server_name: str = "127.0.0.1", port: int = 7870) -> None:
    import uvicorn
    app = create_server_app(host)
    print(f"{TITLE}: http://{server_name}:{port}/  (models: {host.models_dir()}, device: {host.default_device()})",
          flush=True)
    uvicorn.run(app, host=server_name, port=port, log_level="warning")
