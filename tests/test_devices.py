"""Every device the webuis run on, on a machine that has none of them: stand-in availability (monkeypatched
torch), a stand-in DirectML module, and the webui's own `devices` module (tests/webui_stubs) naming mps or xpu.

What must hold: a name is a device or a clear error; a device the machine lacks is a clear error before a job
reads anything; the tab's host takes whatever device the webui runs on; a kind of work that does not run on a
device runs on the CPU with a note saying so.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lib_rebasin import devices

STUBS = Path(__file__).resolve().parent / "webui_stubs"


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(devices, "_VERDICTS", {})


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def fake_directml(monkeypatch, count: int) -> None:
    module = types.ModuleType("torch_directml")
    module.is_available = lambda: count > 0
    module.device_count = lambda: count
    module.device = lambda index=0: torch.device("privateuseone", index)
    monkeypatch.setitem(sys.modules, "torch_directml", module)


@pytest.mark.parametrize("name, expected", [
    ("cpu", "cpu"), ("cuda", "cuda"), (" CUDA:1 ", "cuda:1"), ("mps", "mps"), ("xpu:0", "xpu:0"),
    ("dml", "privateuseone:0"), ("DirectML", "privateuseone:0"), ("privateuseone:1", "privateuseone:1"),
])
def test_names_of_the_webuis_devices(name, expected):
    assert str(devices.parse(name)) == expected


@pytest.mark.parametrize("name", ["", "tpu", "cuda:x", "cpu:1", "meta", "gpu0"])
def test_a_name_that_is_no_device_is_a_clear_error(name):
    with pytest.raises(devices.DeviceError, match="unknown device .* use cpu, cuda"):
        devices.parse(name)


def test_devices_this_machine_lacks_are_clear_errors(monkeypatch):
    fake_cuda(monkeypatch, 0)
    monkeypatch.setitem(sys.modules, "torch_directml", None)  # import fails
    for name, reason in (("cuda", "torch sees no CUDA device"), ("mps", "no Apple GPU"),
                         ("xpu", "no Intel GPU"), ("dml", "torch_directml is not installed")):
        with pytest.raises(devices.DeviceError, match=f"is not available here: .*{reason}"):
            devices.require(name)
    fake_cuda(monkeypatch, 2)
    assert devices.require("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError, match="only 2 cuda devices"):
        devices.require("cuda:2")


def test_choices_list_what_the_machine_has(monkeypatch):
    fake_cuda(monkeypatch, 0)
    monkeypatch.setitem(sys.modules, "torch_directml", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.choices() == ["cpu"]
    fake_cuda(monkeypatch, 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    fake_directml(monkeypatch, 1)
    assert devices.choices() == ["cpu", "cuda", "cuda:0", "cuda:1", "mps", "privateuseone:0"]


@pytest.mark.parametrize("kind", list(devices.WORK))
def test_work_stays_on_a_device_where_it_runs(kind):
    """Each probe passes on a device that computes correctly (the CPU itself), so a working GPU keeps the work."""
    devices.WORK[kind](torch.device("cpu"))
    assert devices.place("cpu", kind) == devices.Placement(torch.device("cpu"))


@pytest.mark.parametrize("name", ["mps", "xpu", "cuda", "privateuseone:0"])
@pytest.mark.parametrize("kind", list(devices.WORK))
def test_work_that_cannot_run_on_a_device_runs_on_the_cpu_with_a_note(name, kind):
    """This torch has none of these backends: every operation there fails, as missing kernels do."""
    placement = devices.place(name, kind)
    assert placement.device == torch.device("cpu")
    assert placement.note.startswith(f"{kind} ran on the CPU: it does not run on {name} (")


def test_a_device_computing_wrong_results_is_not_used(monkeypatch):
    """A backend whose kernels run but disagree with the CPU (seen with young backends) is ruled out too."""
    from lib_rebasin import matching
    real = matching.match

    def wrong_on_the_device(spec, a, b, options=matching.MatchOptions(), **kw):
        result = real(spec, a, b, matching.MatchOptions(screen=options.screen), **kw)
        if options.device != "cpu":
            result.perms = {k: v.flip(0) for k, v in result.perms.items()}
        return result

    monkeypatch.setattr(matching, "match", wrong_on_the_device)
    placement = devices.place("xpu", "matching")
    assert placement.device.type == "cpu" and "differ from the CPU's" in placement.note


def test_out_of_memory_is_recognised_whatever_the_backend_calls_it():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not devices.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# --- the webui's device, through the host adapters -----------------------------------------------------------

@pytest.fixture
def stub_webui(tmp_path, monkeypatch):
    """The webui's stand-in modules (no UI): A1111, or Forge after `forge.apply()`."""
    monkeypatch.setenv("WEBUI_STUB_MODELS", str(tmp_path / "models"))
    monkeypatch.syspath_prepend(str(STUBS))
    forget = [n for n in sys.modules if n.split(".")[0] in ("modules", "backend", "forge")]
    for name in forget:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in ("modules", "backend", "forge")]:
        del sys.modules[name]


@pytest.mark.parametrize("flavor", ["a1111", "forge"])
@pytest.mark.parametrize("device", ["mps", "xpu", "privateuseone:0", "cuda:0"])
def test_the_host_takes_whatever_device_the_webui_runs_on(stub_webui, monkeypatch, flavor, device):
    from modules import devices as webui_devices
    if flavor == "forge":
        import forge
        from backend import memory_management
        monkeypatch.setattr(memory_management, "get_torch_device", lambda: torch.device(device))
        forge.apply()
        from lib_rebasin.host.forge import ForgeHost as HostClass
    else:
        monkeypatch.setattr(webui_devices, "device", torch.device(device))
        from lib_rebasin.host.a1111 import A1111Host as HostClass
    host = HostClass()
    assert host.default_device() == device
    assert host.resolve_device("") == device and host.resolve_device("default") == device
    assert host.resolve_device("cpu") == "cpu" and host.resolve_device("dml") == "privateuseone:0"
    choices = host.device_choices()
    assert choices[0] == "cpu" and device in choices
    with pytest.raises(devices.DeviceError, match="unknown device 'tpu'"):
        host.resolve_device("tpu")


def test_the_permutation_cache_key_holds_the_device_kind_and_the_screening(monkeypatch):
    from lib_rebasin import permcache
    from lib_rebasin.matching import MatchOptions, screening

    def key(**options):
        return permcache.cache_key("rebasin", ["aa", "bb"], ["unet"], MatchOptions(**options))
    # screening as resolved, not as asked: "auto" is whichever of "on" and "off" this CPU resolves it to
    assert key(screen="on") != key(screen="off")
    assert key(screen="auto") == key(screen="on" if screening(MatchOptions()) else "off")
    monkeypatch.setattr(permcache, "screening", lambda options: None)  # stand-in: no CUDA to measure here
    assert key(device="cuda") != key(device="cpu")
    assert key(device="cuda:0") == key(device="cuda:1") == key(device="cuda")  # the kind, not the card


# --- device memory: planned from what is free, a group that does not fit goes to the CPU ----------------------
# `cpu:0` stands in for an accelerator: a device distinct from the CPU matching falls back to, whose tensors
# happen to live in RAM.

ACCELERATOR = "cpu:0"


def planted_pair():
    from lib_rebasin.spec.core import apply_to_state_dict, random_permutations
    from test_matching import drifted, groupnorm_stack
    spec, a = groupnorm_stack(seed=1)
    b = drifted(apply_to_state_dict(spec, a, random_permutations(spec, seed=7)), 0.01, seed=3)
    return spec, a, b


@pytest.mark.parametrize("screen", ["off", "on"])
def test_a_group_the_device_has_no_memory_for_runs_on_the_cpu(monkeypatch, screen):
    from lib_rebasin import costs
    from lib_rebasin.matching import MatchOptions, match
    spec, a, b = planted_pair()
    reference = match(spec, a, b, MatchOptions(screen=screen))
    add = costs.Partial.add
    big = max(g.size for g in spec.groups.values())

    def add_or_run_out(self, *args):
        if self.device == torch.device(ACCELERATOR) and self.size == big:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return add(self, *args)

    monkeypatch.setattr(costs.Partial, "add", add_or_run_out)
    result = match(spec, a, b, MatchOptions(device=ACCELERATOR, screen=screen))
    assert all(torch.equal(result.perms[g], reference.perms[g]) for g in spec.groups)
    assert result.report.cpu_fallback == [g.name for g in spec.groups.values() if g.size == big]
    assert result.report.objective_after == pytest.approx(reference.report.objective_after, rel=1e-9)


def test_other_errors_on_the_device_are_not_hidden(monkeypatch):
    from lib_rebasin import costs
    from lib_rebasin.matching import MatchOptions, match
    spec, a, b = planted_pair()

    def broken(self, *args):
        raise RuntimeError("an unsupported operation")
    monkeypatch.setattr(costs.Partial, "add", broken)
    with pytest.raises(RuntimeError, match="unsupported operation"):
        match(spec, a, b, MatchOptions(device=ACCELERATOR))


def test_the_certification_pass_is_planned_from_free_device_memory(monkeypatch):
    from lib_rebasin import matching
    from lib_rebasin.matching import MatchOptions, make_plan, match
    spec, a, b = planted_pair()
    roomy = match(spec, a, b, MatchOptions(device=ACCELERATOR, screen="off"))
    plan = make_plan(spec, {k: tuple(v.shape) for k, v in a.items()})
    assert roomy.report.memory_plan == matching.device_memory(plan, matching.PASS_MEMORY)  # nothing said: 1 GB
    fixed = matching.device_memory(plan, 0) + matching.DEVICE_SLACK
    for budget in (0, 1000):   # no room for even one cost beside the rest: every group waits for its visit
        monkeypatch.setattr(devices, "free_memory", lambda device: fixed + budget)
        tight = match(spec, a, b, MatchOptions(device=ACCELERATOR, screen="off"))
        assert tight.report.memory_plan == matching.device_memory(plan, budget)
        assert tight.report.sweeps[0].screened < roomy.report.sweeps[0].screened or roomy.report.sweeps[0].screened == 0
        assert all(torch.equal(tight.perms[g], roomy.perms[g]) for g in spec.groups)
        assert tight.report.cpu_fallback == []


def test_a_job_plan_puts_each_part_where_it_runs(monkeypatch):
    """A webui on mps: merging runs there, matching (it needs float64) on the CPU, with one note; float64 merging
    goes to the CPU as well.  Stand-in: mps is 'available' and the probes' verdicts are those of a real Mac."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    verdicts = {"matching": TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                                      "support float64"),
                "merging in float64": TypeError("Cannot convert a MPS Tensor to float64 dtype"), "merging": None}

    def probe(kind):
        def run(device):
            if verdicts[kind] is not None:
                raise verdicts[kind]
        return run
    monkeypatch.setattr(devices, "WORK", {kind: probe(kind) for kind in verdicts})
    plan = devices.plan_job("mps", matching=True)
    assert plan.merging == torch.device("mps") and plan.matching == torch.device("cpu")
    assert plan.notes == ("matching ran on the CPU: it does not run on mps (TypeError: Cannot convert a MPS Tensor "
                          "to float64 dtype as the MPS framework doesn't support float64)",)
    plan = devices.plan_job("mps", matching=False, compute=torch.float64)
    assert plan.merging == torch.device("cpu") and plan.matching is None and len(plan.notes) == 1
    assert devices.plan_job("cpu", matching=True) == devices.JobDevices(torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(devices.DeviceError, match="'cuda' is not available here"):
        devices.plan_job("cuda", matching=True)


# --- the webui's model makes room on any accelerator, and the job's cache goes back after ------------------

def _job(device: str):
    from types import SimpleNamespace
    return SimpleNamespace(device=device, models=[], vae=None)


@pytest.mark.parametrize("device", ["mps", "xpu", "privateuseone:0"])
def test_a1111_frees_its_model_on_any_accelerator_and_empties_the_cache_after(stub_webui, monkeypatch, device):
    from modules import devices as webui_devices, sd_models
    from lib_rebasin.host import a1111
    monkeypatch.setattr(webui_devices, "device", torch.device(device))
    model = sd_models.FakeModel(device)
    sd_models.model_data.sd_model = model
    host = a1111.A1111Host()
    monkeypatch.setattr(a1111, "_free_vram", lambda name: 1 << 30)   # short: 1 GB free
    gc_before = webui_devices.gc_calls
    with host.job_room(_job(device)) as notes:
        assert model.device == "cpu"                                  # the model made room in VRAM
        gc_during = webui_devices.gc_calls
    assert model.moves == ["cpu", device]                              # and came back after
    assert webui_devices.gc_calls >= gc_during + 1 > gc_before         # the job's cache emptied before that
    assert any("was unloaded to make room in VRAM" in n for n in notes)
    gc_before = webui_devices.gc_calls
    with host.job_room(_job("cpu")):                                   # a CPU job leaves the VRAM alone
        pass
    assert model.moves == ["cpu", device] and webui_devices.gc_calls == gc_before


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_forge_frees_its_models_on_any_accelerator_and_empties_its_cache_after(stub_webui, monkeypatch, device):
    from types import SimpleNamespace
    import forge
    from backend import memory_management
    from modules import sd_models
    forge.apply()
    from lib_rebasin.host.forge import ForgeHost
    sd_models.model_data.sd_model = model = sd_models.ForgeModel(None)
    monkeypatch.setattr(memory_management, "current_loaded_models",
                        [SimpleNamespace(model=model, device=torch.device(device))])
    monkeypatch.setitem(memory_management.free_bytes, device, 1 << 30)
    host = ForgeHost()
    memory_management.calls.clear()
    with host.job_room(_job(device)):
        assert memory_management.calls == ["unload_all_models", "soft_empty_cache"]
    assert memory_management.calls[2:] == ["soft_empty_cache", ("load_models_gpu", [model])]
    monkeypatch.setitem(memory_management.free_bytes, device, 20 << 30)  # room to spare: the model stays,
    memory_management.calls.clear()                                      # the job's cache still goes back
    with host.job_room(_job(device)):
        pass
    assert memory_management.calls == ["soft_empty_cache"]
    memory_management.calls.clear()
    with host.job_room(_job("cpu")):
        pass
    assert "soft_empty_cache" not in memory_management.calls


# --- `--device cuda` on a machine without CUDA ---------------------------------------------------------------

@pytest.mark.parametrize("command", [["amp", "-M", "2"], ["rebasin", "--alpha", "0.5"]])
def test_device_cuda_without_cuda_is_a_clear_error_before_anything_is_read(tiny_a, tiny_b, tmp_path, command):
    """(This machine has no CUDA.)  One line on stderr, exit code 2, no output, and the inputs were not even
    hashed (the hash cache stays empty)."""
    import os
    import subprocess
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cache = tmp_path / "cache"
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, LIB_REBASIN_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-m", "lib_rebasin", command[0], str(tiny_a), str(tiny_b), *command[1:],
                           "-o", str(out), "--device", "cuda"], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'cuda' is not available here" in lines[0] and "CUDA" in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) in ([], [cache])
    assert not (cache / "sha256.json").exists()
