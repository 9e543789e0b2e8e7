"""Re-basin merges on tiny synthetic SDXL files, against naive in-memory references and the outside oracle.

The planted pair: B is A with a random valid permutation applied (so B computes A's function) plus a 1 %
drift.  Matching must find exactly the inverse permutation; rebasin(A, B, α=1) is then within the drift of A
while still computing B's function (diffusers/transformers in fp64, tests/oracle.py).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import safetensors.torch
import torch

from lib_rebasin import jobs, rebasin as rb
from lib_rebasin.anatomy import ArchitectureError
from lib_rebasin.checkpoint import Checkpoint, save_state_dict
from lib_rebasin.cli import main
from lib_rebasin.layout import CLIP_G, CLIP_L, UNET
from lib_rebasin.matching import MatchOptions, match
from lib_rebasin.merge import MergeError
from lib_rebasin.progress import Cancelled, Monitor
from lib_rebasin.spec.core import apply_to_state_dict, invert, random_permutations
from lib_rebasin.spec.sdxl import sdxl_spec
from oracle import max_relative_error, oracle_config, random_inputs, random_state_dict, run, single_thread

CONFIG = oracle_config("tiny")
DRIFT = 0.01


def drift(state: dict[str, torch.Tensor], seed: int, size: float = DRIFT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if t.is_floating_point() and t.numel():
            rms = t.double().square().mean().sqrt()
            out[key] = (t.double() + size * rms * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
        else:
            out[key] = t
    return out


def load(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


@pytest.fixture(scope="module")
def spec():
    return sdxl_spec(CONFIG)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, spec):
    """(folder, A, B, planted permutations): B = P(A) + 1 % drift, fp32 files (the tiny oracle model)."""
    folder = tmp_path_factory.mktemp("rebasin")
    a = random_state_dict(CONFIG, seed=1, dtype=torch.float32)
    perms = random_permutations(spec, seed=42)
    b = drift(apply_to_state_dict(spec, a, perms), seed=2)
    pa = save_state_dict(folder / "A.safetensors", a)
    pb = save_state_dict(folder / "B.safetensors", b)
    return folder, pa, pb, perms


@pytest.fixture(scope="module")
def rebased(planted):
    """rebasin(A, B, α = 1) written as float32 (its matching is cached for the other tests)."""
    folder, a, b, _ = planted
    with single_thread():
        return rb.rebasin(a, b, folder / "out_alpha1.safetensors", alpha=1.0, dtype="same")


def test_planted_permutation_is_recovered_and_output_is_near_a(planted, rebased, spec):
    folder, a, b, perms = planted
    expected = invert(perms)
    found = rebased.permutations[0]
    assert sorted(found) == sorted(spec.groups)
    wrong = [name for name in spec.groups if not torch.equal(found[name], expected[name])]
    assert wrong == []
    matching = rebased.report["matching"]
    assert matching["changed_groups"] == f"{len(spec.groups)}/{len(spec.groups)}" and matching["converged"]
    out, ta = load(rebased.path), load(a)
    for key in spec.keys():
        assert (out[key] - ta[key]).norm() <= 2 * DRIFT * ta[key].norm() + 1e-6, key
    assert torch.equal(out[CLIP_L + "embeddings.position_ids"], ta[CLIP_L + "embeddings.position_ids"])


def test_rebased_model_computes_what_b_computes(planted, rebased):
    _, _, b, _ = planted
    out, tb = load(rebased.path), load(b)
    inputs = random_inputs(CONFIG, seed=3)
    with single_thread():
        expected = run({k: v.double() if v.is_floating_point() else v for k, v in tb.items()}, CONFIG, inputs)
        got = run({k: v.double() if v.is_floating_point() else v for k, v in out.items()}, CONFIG, inputs)
    assert max_relative_error(expected, got) < 1e-9
    changed = sum(not torch.equal(out[k], tb[k]) for k in out if out[k].is_floating_point())
    assert changed > 0.9 * sum(1 for k in out if out[k].is_floating_point() and out[k].numel() > 1)


def test_objective_never_decreases_between_sweeps(rebased):
    m = rebased.report["matching"]
    objectives = [m["objective_before"]] + [s["objective"] for s in m["sweeps"]]
    assert len(objectives) >= 3
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(objectives, objectives[1:]))


def test_same_model_is_the_identity_without_solver_calls(planted, spec):
    _, a, _, _ = planted
    with Checkpoint(a) as ckpt, single_thread():
        result = match(spec, ckpt, ckpt, MatchOptions(screen="on"))
    assert all(torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    assert result.report.solver_solved == 0 and result.report.solver_needed > 1000
    assert len(result.report.sweeps) == 1


def test_same_base_pair_skips_the_solver_and_same_seed_gives_same_result(planted, spec):
    folder, a, _, _ = planted
    b = save_state_dict(folder / "A_drift.safetensors", drift(load(a), seed=5))
    with Checkpoint(a) as ca, Checkpoint(b) as cb, single_thread():
        first = match(spec, ca, cb, MatchOptions(seed=3))
        again = match(spec, ca, cb, MatchOptions(seed=3))
    assert first.report.solver_skipped >= 0.9 * first.report.solver_needed
    assert first.report.changed == [] and len(first.report.sweeps) == 1
    assert all(torch.equal(first.perms[n], again.perms[n]) for n in spec.groups)


def test_seed_sets_only_the_visiting_order_and_threads_change_nothing(planted, spec):
    _, a, b, perms = planted
    with Checkpoint(a) as ca, Checkpoint(b) as cb:
        other = match(spec, ca, cb, MatchOptions(seed=9, screen="off", workers=3))
        again = match(spec, ca, cb, MatchOptions(seed=9, screen="off", workers=1))
    expected = invert(perms)
    assert all(torch.equal(other.perms[n], expected[n]) for n in spec.groups)
    assert [s.objective for s in other.report.sweeps] == [s.objective for s in again.report.sweeps]


def naive_basin_sum(ta, tb, perm_b, alpha):
    return alpha * (alpha * ta + (1 - alpha) * tb) + (1 - alpha) * ((1 - alpha) * ta + alpha * perm_b)


def test_basin_sum_equals_its_formula_and_reuses_the_matching(planted, rebased, spec):
    folder, a, b, _ = planted
    alpha = 0.3
    out = rb.basin_sum(a, b, folder / "basin_sum.safetensors", alpha=alpha, dtype="fp32")
    assert out.cache_hit and out.cache_file == rebased.cache_file
    ta, tb, got = load(a), load(b), load(out.path)
    pb = apply_to_state_dict(spec, {k: v.double() for k, v in tb.items() if k in spec.keys()}, out.permutations[0])
    for key in spec.keys():
        expected = naive_basin_sum(ta[key].double(), tb[key].double(), pb[key], alpha)
        assert torch.allclose(got[key].double(), expected, rtol=1e-5, atol=1e-6), key
    assert torch.equal(got[CLIP_L + "embeddings.position_ids"], ta[CLIP_L + "embeddings.position_ids"])
    recipe = json.loads(Checkpoint(out.path).metadata["sd_merge_recipe"])
    assert recipe["method"] == "basin-sum" and recipe["seed"] == 0 and recipe["spec_version"] == "sdxl-1"
    assert recipe["permutation_cache_key"] and recipe["objective"]["after"] > recipe["objective"]["before"]


def test_amp_rebasin_equals_rebasin_of_the_amplified_model(planted, spec):
    """amp = A + 1.5·(B − A) = 1.5·P(A) − 0.5·A + drift is still closest to A under P⁻¹, the planted inverse."""
    folder, a, b, perms = planted
    multiplier, alpha = 1.5, 0.5
    with single_thread():
        out = rb.amp_rebasin(a, b, folder / "amp_rebasin.safetensors", multiplier=multiplier, alpha=alpha,
                             dtype="fp32")
    expected = invert(perms)
    assert all(torch.equal(out.permutations[0][n], expected[n]) for n in spec.groups)
    ta, tb, got = load(a), load(b), load(out.path)
    amp = {k: ta[k].double() + multiplier * (tb[k].double() - ta[k].double()) for k in spec.keys()}
    p_amp = apply_to_state_dict(spec, amp, expected)
    for key in spec.keys():
        reference = (1 - alpha) * ta[key].double() + alpha * p_amp[key]
        assert torch.allclose(got[key].double(), reference, rtol=1e-5, atol=1e-5), key
    recipe = json.loads(Checkpoint(out.path).metadata["sd_merge_recipe"])
    assert recipe["method"] == "amp-rebasin" and recipe["amp_multiplier"] == multiplier


def test_merge_many_returns_the_aligned_mean(tmp_path):
    base = random_state_dict(CONFIG, seed=11, dtype=torch.float32)
    unet_spec = sdxl_spec(CONFIG, components=("unet",))
    p2, p3 = random_permutations(unet_spec, seed=21), random_permutations(unet_spec, seed=22)
    models = [drift(base, 31), drift(apply_to_state_dict(unet_spec, base, p2), 32),
              drift(apply_to_state_dict(unet_spec, base, p3), 33)]
    paths = [save_state_dict(tmp_path / f"M{i}.safetensors", m) for i, m in enumerate(models)]
    with single_thread():  # the UNet only (text encoders from M1) keeps the test short
        out = rb.merge_many(paths, tmp_path / "many.safetensors", dtype="fp32", components={"clip": "a"})
    sets = out.permutations
    assert all(torch.equal(p, torch.arange(len(p))) for p in sets[0].values())
    for found, planted_perms in ((sets[1], p2), (sets[2], p3)):
        expected = invert(planted_perms)
        assert all(torch.equal(found[n], expected[n]) for n in unet_spec.groups)
    aligned = [models[0]] + [apply_to_state_dict(unet_spec, m, invert(p)) for m, p in ((models[1], p2), (models[2], p3))]
    got = load(out.path)
    assert all(torch.equal(got[k], models[0][k]) for k in got if k.startswith((CLIP_L, CLIP_G)))
    for key in unet_spec.keys():
        expected = sum(m[key].double() for m in aligned) / 3
        assert torch.allclose(got[key].double(), expected, rtol=1e-6, atol=1e-6), key
        assert (got[key].double() - base[key].double()).norm() <= DRIFT * base[key].double().norm() + 1e-6
    assert out.report["matching"]["converged"]


def test_text_encoders_taken_from_a_stay_unpermuted(planted, spec):
    folder, a, b, perms = planted
    with single_thread():
        out = rb.rebasin(a, b, folder / "unet_only.safetensors", alpha=1.0, dtype="same",
                         components={"clip": "a"})
    groups = out.permutations[0]
    assert groups and all(name.startswith("unet.") for name in groups)
    got, ta = load(out.path), load(a)
    for key in ta:
        if key.startswith((CLIP_L, CLIP_G)):
            assert torch.equal(got[key], ta[key]), key


def test_cancel_leaves_no_file(planted, tmp_path):
    _, a, b, _ = planted
    for after in (3, 40):  # while hashing/matching, and later
        reports = []

        def cancelled():
            reports.append(1)
            return len(reports) > after

        with pytest.raises(Cancelled):
            rb.rebasin(a, b, tmp_path / "cancelled.safetensors", cache=False, monitor=Monitor(is_cancelled=cancelled))
        assert list(tmp_path.iterdir()) == []


def test_cancel_while_writing_leaves_no_file(planted, rebased, tmp_path):
    folder, a, b, _ = planted
    messages = []

    def on_progress(fraction, message):
        messages.append(fraction)

    def cancelled():
        return bool(messages) and messages[-1] > rb.MATCH_SHARE + 0.01

    with pytest.raises(Cancelled):
        rb.rebasin(a, b, tmp_path / "cancelled.safetensors", cache_dir=folder,
                   monitor=Monitor(on_progress, cancelled))
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_cache_file_is_ignored(planted, rebased, tmp_path):
    folder, a, b, perms = planted
    cache = tmp_path / "cache"
    cache.mkdir()
    damaged = cache / os.path.basename(rebased.cache_file)
    damaged.write_bytes(b"not a safetensors file")
    with single_thread():
        out = rb.rebasin(a, b, tmp_path / "out.safetensors", alpha=1.0, cache_dir=cache)
    assert not out.cache_hit
    expected = invert(perms)
    assert all(torch.equal(out.permutations[0][n], expected[n]) for n in expected)


def test_bad_inputs_are_refused_before_writing(planted, tmp_path):
    _, a, b, _ = planted
    with pytest.raises(MergeError, match="finite"):
        rb.rebasin(a, b, tmp_path / "x.safetensors", alpha=math.nan)
    with pytest.raises(MergeError, match="nothing to re-basin"):
        rb.rebasin(a, b, tmp_path / "x.safetensors", components={"unet": "a", "clip": "b"})
    wrong = load(b)
    wrong[UNET + "out.2.weight"] = torch.zeros(4, 64, 1, 1)
    odd = save_state_dict(tmp_path / "odd.safetensors", wrong)
    with pytest.raises(MergeError, match="different shapes"):
        rb.rebasin(a, odd, tmp_path / "x.safetensors")
    sd1 = save_state_dict(tmp_path / "sd1.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    with pytest.raises((ArchitectureError, MergeError)):
        rb.rebasin(a, sd1, tmp_path / "x.safetensors")
    with pytest.raises(MergeError, match="twice"):
        rb.merge_many([a, a], tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.safetensors", "sd1.safetensors"]


def test_cli_and_job_entry_point(planted, rebased, tmp_path, capsys):
    folder, a, b, _ = planted
    out = tmp_path / "cli.safetensors"
    code = main(["rebasin", str(a), str(b), "--alpha", "0.25", "-o", str(out), "--cache-dir", str(folder),
                 "--report", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and "permutations from cache" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["matching"]["cache_hit"] and report["formula"] == "(1 − 0.25)·A + 0.25·P(B)"
    request = jobs.MergeRequest("rebasin", [str(a), str(b)], str(folder / "job.safetensors"), alpha=0.25)
    result = jobs.run(request)  # written beside the cached matching: reuses it
    assert os.path.isfile(result.path) and result.report["matching"]["changed_groups"].endswith("/106")
    assert torch.equal(load(result.path)[UNET + "out.2.weight"], load(out)[UNET + "out.2.weight"])


def test_chart_is_a_png(rebased, tmp_path):
    pytest.importorskip("matplotlib")
    from lib_rebasin.report_chart import write_chart
    path = write_chart(rebased.report, tmp_path / "chart.png")
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
