"""The user interface: the Gradio tab (tab.py, xyz.py), the REST routes (api.py), the webui hooks (webui.py) and
the standalone app (app.py).  The only package that imports gradio."""
