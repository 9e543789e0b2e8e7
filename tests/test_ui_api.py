"""REST routes under /rebasin/v1 against the standalone host: start a merge, poll it, interrupt it; only names
from the checkpoint list; outputs inside the models folder; HTTP Basic authentication when configured."""
from __future__ import annotations

import base64
import os
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_rebasin import jobs  # noqa: E402
from lib_rebasin.host.standalone import StandaloneHost  # noqa: E402
from lib_rebasin.ui import api  # noqa: E402
from ui_support import act_at, copy_models, leftovers, read  # noqa: E402


@pytest.fixture
def models(tmp_path, tiny_a, tiny_b):
    folder = tmp_path / "models"
    copy_models({"a.safetensors": tiny_a, "b.safetensors": tiny_b}, folder)
    return folder


def client_for(host: StandaloneHost, **kwargs) -> TestClient:
    app = FastAPI()
    api.mount(app, host)
    return TestClient(app, **kwargs)


def wait(client: TestClient, job: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/rebasin/v1/jobs/{job}").json()
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job} still {status['state']}")


def test_merge_through_the_api(models):
    client = client_for(StandaloneHost(str(models), device="cpu"))
    methods = client.get("/rebasin/v1/methods").json()
    assert list(methods) == list(jobs.METHODS) and methods["amp"]["formula"] == "A + M·(B − A)"
    assert methods["weighted-sum"]["formula"] == "(1 − α)·A + α·B"
    assert not [m for m in methods.values() if "{" in m["formula"]]  # formulas for people, not templates
    assert client.get("/rebasin/v1/checkpoints").json()["checkpoints"] == ["a.safetensors", "b.safetensors"]
    started = client.post("/rebasin/v1/merge", json={"method": "amp", "models": ["a.safetensors", "b.safetensors"],
                                                     "multiplier": 3, "dtype": "fp32", "output_name": "api"})
    assert started.status_code == 200, started.text
    status = wait(client, started.json()["job"])
    assert status["state"] == "done" and status["progress"] == 1.0, status
    out = models / "api.safetensors"
    assert status["result"]["path"] == str(out) and status["result"]["title"] == "api.safetensors"
    key = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    a, b = read(models / "a.safetensors", key).float(), read(models / "b.safetensors", key).float()
    torch.testing.assert_close(read(out, key), a + 3 * (b - a), rtol=1e-6, atol=1e-6)
    assert "api.safetensors" in client.get("/rebasin/v1/checkpoints").json()["checkpoints"]


@pytest.mark.parametrize("body, message", [
    ({"method": "amp", "models": ["a.safetensors", "/etc/passwd"]}, "not in the checkpoint list"),
    ({"method": "amp", "models": ["a.safetensors", "../models/b.safetensors"]}, "not in the checkpoint list"),
    ({"method": "amp", "models": "a.safetensors"}, "list of checkpoint names"),
    ({"method": "amp", "models": ["a.safetensors", "b.safetensors"], "output": "/tmp/x"}, "unknown field"),
    ({"method": "amp", "models": ["a.safetensors", "b.safetensors"], "multiplier": "lots"}, "could not convert"),
    ({"method": "amp", "models": ["a.safetensors", "b.safetensors"], "components": "unet"}, "'components' must"),
    ({"method": "amp", "models": ["a.safetensors", "b.safetensors"], "seed": "x"}, "invalid literal"),
])
def test_bad_requests_are_refused_before_anything_runs(models, body, message):
    client = client_for(StandaloneHost(str(models), device="cpu"))
    response = client.post("/rebasin/v1/merge", json=body)
    assert response.status_code == 422 and message in response.json()["detail"]
    assert sorted(os.listdir(models)) == ["a.safetensors", "b.safetensors"]


def test_an_output_name_cannot_leave_the_models_folder(models):
    client = client_for(StandaloneHost(str(models), device="cpu"))
    job = client.post("/rebasin/v1/merge", json={"method": "weighted-sum", "models": ["a.safetensors", "b.safetensors"],
                                                 "output_name": "../escaped"}).json()["job"]
    status = wait(client, job)
    assert status["state"] == "done" and os.path.dirname(status["result"]["path"]) == str(models)
    assert not (models.parent / "escaped.safetensors").exists()


def test_failures_are_reported(models, monkeypatch):
    client = client_for(StandaloneHost(str(models), device="cpu"))
    monkeypatch.setattr(jobs, "run", lambda request, monitor: (_ for _ in ()).throw(
        ValueError("method rebasin is not available yet")))
    job = client.post("/rebasin/v1/merge", json={"method": "rebasin", "models": ["a.safetensors", "b.safetensors"]})
    status = wait(client, job.json()["job"])
    assert status["state"] == "failed" and status["error"] == "method rebasin is not available yet"


def test_interrupt_a_running_and_a_queued_job(models, monkeypatch):
    host = StandaloneHost(str(models), device="cpu")
    client = client_for(host)
    running = threading.Event()

    def endless(request, monitor):  # a job that only stops when cancelled
        running.set()
        while True:
            monitor.report(0.5, "working")
            time.sleep(0.01)
    monkeypatch.setattr(jobs, "run", endless)
    body = {"method": "amp", "models": ["a.safetensors", "b.safetensors"]}
    first = client.post("/rebasin/v1/merge", json=body).json()["job"]
    assert running.wait(10)
    second = client.post("/rebasin/v1/merge", json=body).json()["job"]
    assert wait(client, second, states=("queued",))["state"] == "queued"
    assert client.post(f"/rebasin/v1/jobs/{second}/interrupt").json()["state"] == "queued"
    assert wait(client, first, states=("running",))["progress"] == 0.5
    client.post(f"/rebasin/v1/jobs/{first}/interrupt")
    assert wait(client, first)["state"] == "cancelled"
    assert wait(client, second)["state"] == "cancelled"
    assert leftovers(models) == [] and host.interrupt() is False
    assert client.get("/rebasin/v1/jobs/nope").status_code == 404


def test_a_real_merge_interrupted_leaves_no_file(models):
    host = StandaloneHost(str(models), device="cpu")
    client = client_for(host)
    act_at(host, 0.0, host.interrupt)  # at its first progress report (the route's part is tested above)
    job = client.post("/rebasin/v1/merge", json={"method": "amp", "models": ["a.safetensors", "b.safetensors"],
                                                 "output_name": "stopped"}).json()["job"]
    assert wait(client, job)["state"] == "cancelled"
    assert sorted(os.listdir(models)) == ["a.safetensors", "b.safetensors"]


def test_credentials_are_required_when_configured(models):
    client = client_for(StandaloneHost(str(models), device="cpu", api_auth="alice:secret"))
    assert client.get("/rebasin/v1/checkpoints").status_code == 401
    wrong = base64.b64encode(b"alice:nope").decode()
    assert client.get("/rebasin/v1/checkpoints", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"alice:secret").decode()
    response = client.get("/rebasin/v1/checkpoints", headers={"Authorization": f"Basic {right}"})
    assert response.status_code == 200 and "a.safetensors" in response.json()["checkpoints"]
    assert client.post("/rebasin/v1/merge", json={}).status_code == 401

