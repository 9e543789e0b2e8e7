"""Hosts of the merge tab: AUTOMATIC1111, Forge, and the standalone app (see base.Host)."""
from __future__ import annotations

from .base import Host, Settings, UnknownCheckpoint, XyzTargets


def webui_host() -> Host:
    """The host for the webui this process runs inside (call from the webui's scripts only)."""
    from .forge import ForgeHost, running_in_forge
    if running_in_forge():
        return ForgeHost()
    from .a1111 import A1111Host
    return A1111Host()


__all__ = ["Host", "Settings", "UnknownCheckpoint", "XyzTargets", "webui_host"]
