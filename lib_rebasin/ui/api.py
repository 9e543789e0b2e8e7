"""REST routes under /rebasin/v1: list methods and checkpoints, start a merge, poll it, interrupt it.

    GET  /rebasin/v1/methods
    GET  /rebasin/v1/checkpoints
    POST /rebasin/v1/merge                {"method": "amp", "models": ["a.safetensors", "b.safetensors"],
                                           "multiplier": 2, "output_name": "", ...}  -> {"job": id, ...}
    GET  /rebasin/v1/jobs/{id}            -> {"state": queued|running|done|failed|cancelled, "progress", ...}
    POST /rebasin/v1/jobs/{id}/interrupt

Models are names from the host's checkpoint list (nothing else is accepted), the output name stays inside the
models folder.  With credentials (the webui's --api-auth) every route wants HTTP Basic authentication.  A merge
runs in a thread under the host's lock (the webui's queue lock), one job at a time.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from secrets import compare_digest

from fastapi import Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import jobs
from ..anatomy import ArchitectureError
from ..checkpoint import CheckpointError
from ..host.base import Host
from ..progress import Cancelled
from . import forms

PREFIX = "/rebasin/v1"
KEPT_JOBS = 50
RECIPE_KEYS = {f.name for f in dataclasses.fields(forms.Recipe)}


@dataclass
class Job:
    id: str
    recipe: dict
    state: str = "queued"
    progress: float = 0.0
    message: str = ""
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    cancel_requested: bool = False

    def to_dict(self) -> dict:
        return {"job": self.id, "state": self.state, "progress": round(self.progress, 4), "message": self.message,
                "result": self.result, "error": self.error, "recipe": self.recipe}


class JobBoard:
    """The API's merges: start one in a thread, report its state, interrupt it."""

    def __init__(self, host: Host):
        self.host = host
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return job

    def start(self, body: dict) -> Job:
        unknown = set(body) - RECIPE_KEYS
        if unknown:
            raise HTTPException(status_code=422, detail=f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(body.get("models"), list) or not all(isinstance(m, str) for m in body["models"]):
            raise HTTPException(status_code=422, detail="'models' must be a list of checkpoint names")
        if not isinstance(body.get("components", {}), dict):
            raise HTTPException(status_code=422, detail="'components' must map components to merge, a or b")
        try:
            recipe = forms.Recipe(**{"method": "", **body})
            request = forms.build_request(self.host, recipe)
        except (ValueError, TypeError) as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        job = Job(id=uuid.uuid4().hex[:12], recipe=body)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT_JOBS:
                oldest = next(iter(self._jobs.values()))
                if oldest.state in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, request), name=f"rebasin-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job, request: jobs.MergeRequest) -> None:
        def on_start() -> None:
            if job.cancel_requested:
                raise Cancelled("interrupted before it started")
            job.state = "running"

        def on_progress(fraction: float, message: str) -> None:
            job.progress, job.message = fraction, message

        notes: list[str] = []

        def merge(monitor):
            with self.host.job_room(request) as room:
                result = jobs.run(request, monitor)
                late = self.host.interrupted()  # asked after the last point where the job could stop
            notes.extend(room)
            return result, late

        try:
            result, late = self.host.run_job(f"rebasin-api-{job.id}", merge, on_progress=on_progress,
                                             on_start=on_start)
        except Cancelled:
            job.state, job.message = "cancelled", "interrupted: no file was written"
            return
        except (ValueError, CheckpointError, ArchitectureError) as e:
            job.state, job.error = "failed", str(e)
            return
        except Exception as e:  # reported to the caller instead of dying silently in the thread
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            raise
        self.host.refresh_checkpoints()
        job.result = {"path": result.path, "title": self.host.title_for_path(result.path), "bytes": result.bytes,
                      "seconds": result.seconds, "warnings": list(result.warnings), "report": result.report,
                      "chart": result.chart, "notes": notes}
        job.state, job.progress = "done", 1.0
        job.message = "done (the interrupt came too late to stop the write)" if late else "done"

    def interrupt(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state == "queued":
            job.cancel_requested = True
        elif job.state == "running":
            self.host.interrupt()
        return job


def _authenticator(credentials: dict[str, str]):
    def authenticate(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        if expected is None or not compare_digest(given.password.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
    return authenticate


def mount(app: FastAPI, host: Host) -> JobBoard:
    """Add the routes to a FastAPI app (the webui's, on app_started, or the standalone app's)."""
    board = JobBoard(host)
    credentials = host.api_credentials()
    dependencies = [Depends(_authenticator(credentials))] if credentials else []

    def methods() -> dict:
        return {key: {"label": m.label, "models": m.n_models, "formula": forms.formula_symbols(key),
                      "uses_multiplier": m.uses_multiplier, "uses_alpha": m.uses_alpha, "uses_seed": m.uses_seed}
                for key, m in jobs.METHODS.items()}

    def checkpoints() -> dict:
        host.refresh_checkpoints()
        return {"checkpoints": host.checkpoint_titles(), "vae": list(host.vae_files()),
                "models_dir": host.models_dir()}

    def start(body: dict = Body(...)) -> dict:
        return board.start(body).to_dict()

    def status(job_id: str) -> dict:
        return board.get(job_id).to_dict()

    def interrupt(job_id: str) -> dict:
        return board.interrupt(job_id).to_dict()

    app.add_api_route(f"{PREFIX}/methods", methods, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/checkpoints", checkpoints, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/merge", start, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", status, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/interrupt", interrupt, methods=["POST"], dependencies=dependencies)
    return board
