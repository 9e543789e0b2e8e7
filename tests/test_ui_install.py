"""install.py, as the webui runs it (`python install.py` with the webui root on the path, so `import launch`)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(__file__).resolve().parent / "webui_stubs"


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.syspath_prepend(str(STUBS))
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    import launch
    yield launch
    sys.modules.pop("launch", None)


def test_installs_only_what_is_missing_and_never_torch(launch, monkeypatch):
    real = launch.is_installed
    monkeypatch.setattr(launch, "is_installed", lambda package: package != "scipy" and real(package))
    runpy.run_path(str(ROOT / "install.py"))
    assert launch.pip_commands == ["install scipy"]


def test_does_nothing_when_everything_is_there(launch):
    runpy.run_path(str(ROOT / "install.py"))
    assert launch.pip_commands == []
    source = (ROOT / "install.py").read_text()
    assert "torch" not in source.split('"""')[-1]  # the code (not the docstring) never names torch
