"""SDXL checkpoint merging: amplified difference and exact Git Re-Basin, as a library, CLI, webui extension
and standalone app."""

__version__ = "0.1.0"
PROJECT = "sd-webui-rebasin"
