"""The streamed linear merges against a naive fp64 in-memory reference, and every refusal before writing."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_rebasin import jobs
from lib_rebasin.checkpoint import Checkpoint, CheckpointError
from lib_rebasin.cli import main
from lib_rebasin.merge import MergeError, UnsafeOutputError, linear_merge
from lib_rebasin.progress import Cancelled, Monitor

UNET = "model.diffusion_model."
VAE = "first_stage_model."
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


@pytest.fixture(scope="module")
def a_sd(tiny_a):
    return load_file(tiny_a)


@pytest.fixture(scope="module")
def b_sd(tiny_b):
    return load_file(tiny_b)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` around each value of x (fp64), subnormals included."""
    _, exponent = torch.frexp(x)
    lowest = round(math.log2(torch.finfo(dtype).tiny))
    return torch.pow(2.0, (exponent - 1).clamp(min=lowest).double() - MANTISSA[dtype])


def is_merged(key: str) -> bool:
    return not key.startswith(VAE) and "." in key and not key.endswith("position_ids")


def assert_within_one_ulp(out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, key: str,
                          slack: torch.Tensor | float = 0.0) -> None:
    """|out − reference| ≤ one ulp of the output dtype (+ `slack`: the compute dtype's own rounding of the terms,
    which no evaluation order avoids when M is not a power of two and the result cancels to ~0)."""
    assert out.dtype == dtype, key
    error = (out.double() - reference).abs()
    bad = error > ulp(reference, dtype) + slack
    assert not bool(bad.any()), f"{key}: {int(bad.sum())} values off by more than one ulp, max error {error.max()}"


def rounding_of_terms(compute: torch.dtype, *terms: torch.Tensor) -> torch.Tensor:
    return 4 * torch.finfo(compute).eps * sum(t.abs() for t in terms)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def written_files(folder):
    return sorted(p.name for p in folder.iterdir())


# --- equal to a naive fp64 reference -------------------------------------------------------------------------------

# One ulp needs M·(B − A) exact in the compute dtype (M = 2 in fp32), or fp64 compute: with fp32 and M = −0.7 a
# result that cancels to ~0 keeps fp32's rounding error, far more than one ulp of its tiny value.
# The default case is checked on every key; the others (an fp64 reference is slow on a busy machine) on every
# fifth merged key, which still covers every kind of layer.
@pytest.mark.parametrize("dtype, compute, multiplier, every", [("fp16", "fp32", 2.0, 1), ("bf16", "fp32", 2.0, 5),
                                                                ("bf16", "fp64", -0.7, 5), ("fp32", "fp64", 2.0, 5)])
def test_amp_matches_naive_fp64_reference(tiny_a, tiny_b, a_sd, b_sd, tmp_path, dtype, compute, multiplier, every):
    out = tmp_path / "amp.safetensors"
    linear_merge("amp", [tiny_a, tiny_b], out, weight=multiplier, dtype=dtype, compute=compute)
    merged = load_file(out)
    target = DTYPES[dtype]
    with Checkpoint(out) as written, Checkpoint(tiny_a) as a:
        assert written.keys() == a.keys()  # A's keys, in A's order
    for index, (key, a) in enumerate(a_sd.items()):
        if index % every:
            continue
        if not a.is_floating_point():
            assert torch.equal(merged[key], a) and merged[key].dtype == a.dtype, key
        elif is_merged(key):
            a64, b64 = a.double(), b_sd[key].double()
            slack = 0.0 if multiplier == 2.0 else rounding_of_terms(DTYPES[compute], a64, multiplier * (b64 - a64))
            assert_within_one_ulp(merged[key], a64 + multiplier * (b64 - a64), target, key, slack)
        else:  # VAE and other keys come from A by default
            assert torch.equal(merged[key], a.to(target)), key


def test_add_difference_and_weighted_sum_match_reference(tiny_a, tiny_b, tiny_c, a_sd, b_sd, tmp_path):
    c_sd = load_file(tiny_c)
    linear_merge("add-diff", [tiny_a, tiny_b, tiny_c], tmp_path / "ad.safetensors", weight=1.5,
                 components={"vae": "merge"})
    linear_merge("weighted-sum", [tiny_a, tiny_b], tmp_path / "ws.safetensors", weight=0.3, dtype="bf16",
                 compute="fp64")
    add_diff, ws = load_file(tmp_path / "ad.safetensors"), load_file(tmp_path / "ws.safetensors")
    for key, a in a_sd.items():
        if not a.is_floating_point() or key.endswith("position_ids"):
            continue
        a64, b64, c64 = a.double(), b_sd[key].double(), c_sd[key].double()
        assert_within_one_ulp(add_diff[key], a64 + 1.5 * (b64 - c64), torch.float16, key)
        if is_merged(key):
            a64, b64 = a.double(), b_sd[key].double()
            assert_within_one_ulp(ws[key], 0.7 * a64 + 0.3 * b64, torch.bfloat16, key,
                                  rounding_of_terms(torch.float64, a64, b64))


@pytest.mark.parametrize("method, weight, expected", [("amp", 0.0, "a"), ("amp", 1.0, "b"),
                                                      ("weighted-sum", 0.0, "a"), ("weighted-sum", 1.0, "b")])
def test_zero_and_one_give_the_inputs_bit_exactly(tiny_a, tiny_b, a_sd, b_sd, tmp_path, method, weight, expected):
    out = tmp_path / "out.safetensors"
    linear_merge(method, [tiny_a, tiny_b], out, weight=weight, dtype="same",
                 components={c: "merge" for c in ("unet", "clip_l", "clip_g", "vae", "other")})
    merged, source = load_file(out), (a_sd if expected == "a" else b_sd)
    for key, value in merged.items():
        assert value.dtype == source[key].dtype and torch.equal(bits(value), bits(source[key])), key


def test_position_ids_and_integers_are_copied_from_a_bit_for_bit(tiny_a, b_sd, tmp_path):
    changed = dict(b_sd)
    changed[POSITION_IDS] = torch.flip(b_sd[POSITION_IDS], dims=[1]).contiguous()
    save_file(changed, tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    linear_merge("amp", [tiny_a, tmp_path / "b.safetensors"], out, weight=2.0, dtype="bf16",
                 components={"other": "merge"})
    merged, a = load_file(out), load_file(tiny_a)
    assert merged[POSITION_IDS].dtype == torch.int64
    assert torch.equal(merged[POSITION_IDS], a[POSITION_IDS])
    assert torch.equal(merged["v_pred"], a["v_pred"]) and merged["v_pred"].dtype == torch.int64


def test_keys_in_only_one_model_are_passed_through_and_listed(tiny_a, a_sd, b_sd, tmp_path):
    unet_only = {k: v for k, v in b_sd.items() if k.startswith(UNET)}
    unet_only["extra.only_in_b"] = torch.tensor([1.5, -2.0], dtype=torch.float16)
    save_file(unet_only, tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    outcome = linear_merge("amp", [tiny_a, tmp_path / "b.safetensors"], out, weight=2.0)
    merged = load_file(out)
    clip_keys = [k for k in a_sd if k.startswith("conditioner.") and a_sd[k].is_floating_point()]
    for key in clip_keys:  # a merged component that B lacks: A's tensor, unmerged
        assert torch.equal(merged[key], a_sd[key]), key
    assert torch.equal(merged["extra.only_in_b"], unet_only["extra.only_in_b"])
    with Checkpoint(out) as written:
        assert written.keys()[-1] == "extra.only_in_b"
    missing = outcome.report["missing"]
    assert missing["a"] == ["extra.only_in_b"]
    assert set(missing["b"]) == set(a_sd) - set(unet_only)
    assert outcome.report["missing_from_b"] == len(missing["b"])
    assert any("lacks" in w and "CLIP-L" in w for w in outcome.warnings)


# --- refusals before anything is written ---------------------------------------------------------------------------

def sd15_state_dict() -> dict[str, torch.Tensor]:
    """A few keys with SD1.5's names and widths: a CLIP-L text encoder and 768-wide cross-attention."""
    t = "cond_stage_model.transformer.text_model."
    return {
        UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=torch.float16),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768, dtype=torch.float16),
        t + "embeddings.position_ids": torch.arange(77).reshape(1, 77),
        t + "encoder.layers.0.self_attn.q_proj.weight": torch.zeros(768, 768, dtype=torch.float16),
    }


def test_sdxl_with_sd15_is_refused_naming_both(tiny_a, tmp_path):
    save_file(sd15_state_dict(), tmp_path / "sd15.safetensors")
    with pytest.raises(MergeError) as error:
        linear_merge("amp", [tiny_a, tmp_path / "sd15.safetensors"], tmp_path / "out.safetensors", weight=2.0)
    message = str(error.value)
    assert "tiny_a.safetensors" in message and "sd15.safetensors" in message
    assert "SDXL base" in message and "SD1.x" in message
    assert written_files(tmp_path) == ["sd15.safetensors"]


def test_shape_mismatches_are_listed_by_key(tiny_a, b_sd, tmp_path):
    wrong = dict(b_sd)
    keys = [UNET + "out.2.weight", UNET + "input_blocks.1.0.emb_layers.1.weight"]
    for key in keys:
        wrong[key] = wrong[key][:-1].contiguous()
    save_file(wrong, tmp_path / "b.safetensors")
    with pytest.raises(MergeError) as error:
        linear_merge("amp", [tiny_a, tmp_path / "b.safetensors"], tmp_path / "out.safetensors", weight=2.0)
    assert "2 tensors" in str(error.value) and keys[0] in str(error.value)
    assert sorted(d.split(":")[0] for d in error.value.details) == sorted(keys)
    assert written_files(tmp_path) == ["b.safetensors"]


def test_free_disk_space_is_checked_first(tiny_a, tiny_b, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(CheckpointError, match="not enough free disk space"):
        linear_merge("amp", [tiny_a, tiny_b], tmp_path / "out.safetensors", weight=2.0)
    assert written_files(tmp_path) == []


@pytest.fixture(scope="module")
def b_unsafe(b_sd, tmp_path_factory):
    """tiny_b with NaN in one key, inf in another, and a value that 2B − A takes past fp16's range."""
    unsafe = dict(b_sd)
    nan_key, inf_key, big_key = UNET + "out.2.weight", UNET + "time_embed.0.bias", UNET + "label_emb.0.0.bias"
    for key, value in ((nan_key, math.nan), (inf_key, math.inf), (big_key, 40000.0)):
        unsafe[key] = b_sd[key].clone()
        unsafe[key].view(-1)[:3] = value
    path = tmp_path_factory.mktemp("unsafe") / "b_unsafe.safetensors"
    save_file(unsafe, path)
    return path, nan_key, inf_key, big_key


def test_nonfinite_and_out_of_range_values_fail_naming_keys(tiny_a, b_unsafe, tmp_path):
    path, nan_key, inf_key, big_key = b_unsafe
    with pytest.raises(UnsafeOutputError) as error:
        linear_merge("amp", [tiny_a, path], tmp_path / "out.safetensors", weight=2.0)
    message = str(error.value)
    assert nan_key in message and inf_key in message and big_key in message and "65504" in message
    counts = {e["key"]: (e["nan"], e["inf"]) for e in error.value.report["nonfinite"]}
    assert counts == {nan_key: (3, 0), inf_key: (0, 3)}
    assert [e["key"] for e in error.value.report["out_of_range"]] == [big_key]
    assert error.value.report["out_of_range"][0]["max_abs"] > 65504
    json.dumps(error.value.report, allow_nan=False)  # strict JSON even with NaN in the inputs
    assert written_files(tmp_path) == []


def test_allow_nonfinite_writes_and_warns(tiny_a, b_unsafe, tmp_path):
    path, nan_key, _, big_key = b_unsafe
    out = tmp_path / "out.safetensors"
    outcome = linear_merge("amp", [tiny_a, path], out, weight=2.0, allow_nonfinite=True)
    assert out.exists() and any(nan_key in w for w in outcome.warnings)
    assert torch.isinf(load_file(out)[big_key].view(-1)[:3]).all()
    # in fp32 the big values fit: only the NaN and inf keys are reported
    outcome = linear_merge("amp", [tiny_a, path], tmp_path / "fp32.safetensors", weight=2.0, dtype="fp32",
                           allow_nonfinite=True)
    assert outcome.report["out_of_range"] == [] and outcome.report["nonfinite_keys"] == 2


def test_clamp_keeps_merged_values_between_a_and_b(tiny_a, tiny_b, a_sd, b_sd, tmp_path):
    out = tmp_path / "out.safetensors"
    linear_merge("amp", [tiny_a, tiny_b], out, weight=2.0, clamp=True, dtype="fp32")
    merged = load_file(out)
    for key, a in a_sd.items():
        if is_merged(key) and a.is_floating_point():
            b = b_sd[key]
            expected = torch.clamp(2.0 * b.double() - a.double(), torch.minimum(a, b).double(),
                                   torch.maximum(a, b).double())
            assert torch.equal(merged[key].double(), expected), key


def test_cancel_leaves_no_file(tiny_a, tiny_b, tmp_path):
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 40

    with pytest.raises(Cancelled):
        linear_merge("amp", [tiny_a, tiny_b], tmp_path / "out.safetensors", weight=2.0,
                     monitor=Monitor(is_cancelled=cancelled))
    assert len(calls) > 40
    assert written_files(tmp_path) == []


def test_never_overwrites_inputs_or_existing_files(tiny_a, tiny_b, tmp_path):
    a_copy = tmp_path / "a.safetensors"
    shutil.copyfile(tiny_a, a_copy)
    before = a_copy.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="input"):
            linear_merge("amp", [a_copy, tiny_b], a_copy, weight=2.0, overwrite=overwrite)
    assert a_copy.read_bytes() == before
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        linear_merge("amp", [tiny_a, tiny_b], existing, weight=2.0)
    assert existing.read_bytes() == b"keep me"
    linear_merge("amp", [tiny_a, tiny_b], existing, weight=2.0, overwrite=True)
    assert len(load_file(existing)) == len(load_file(tiny_a))
    assert written_files(tmp_path) == ["a.safetensors", "existing.safetensors"]


# --- components and the VAE file -----------------------------------------------------------------------------------

def test_components_choose_their_source(tiny_a, tiny_b, a_sd, b_sd, tmp_path):
    out = tmp_path / "out.safetensors"
    outcome = linear_merge("amp", [tiny_a, tiny_b], out, weight=2.0, dtype="same",
                           components={"unet": "a", "clip": "b", "vae": "b"})
    merged = load_file(out)
    for key, value in merged.items():
        source = b_sd if key.startswith(("conditioner.", VAE)) and value.is_floating_point() else a_sd
        assert torch.equal(bits(value), bits(source[key])), key
    sources = {name: c["source"] for name, c in outcome.report["components"].items()}
    assert sources == {"unet": "a", "clip_l": "b", "clip_g": "b", "vae": "b", "other": "a"}
    assert outcome.report["merged_keys"] == 0


def test_vae_from_a_standalone_vae_file(tiny_a, tiny_b, b_sd, tmp_path):
    vae = {k[len(VAE):]: v.float() for k, v in b_sd.items() if k.startswith(VAE)}
    save_file(vae, tmp_path / "vae.safetensors")
    out = tmp_path / "out.safetensors"
    linear_merge("amp", [tiny_a, tiny_b], out, weight=2.0, vae=tmp_path / "vae.safetensors")
    merged = load_file(out)
    for key, value in vae.items():
        assert torch.equal(merged[VAE + key], value.half()), key
    vae["decoder.conv_out.weight"] = vae["decoder.conv_out.weight"][:, :-1].contiguous()
    save_file(vae, tmp_path / "bad_vae.safetensors")
    with pytest.raises(MergeError, match="VAE"):
        linear_merge("amp", [tiny_a, tiny_b], tmp_path / "out2.safetensors", weight=2.0,
                     vae=tmp_path / "bad_vae.safetensors")


# --- the report ----------------------------------------------------------------------------------------------------

def test_report_block_norms_match_a_naive_computation(tiny_a, tiny_b, a_sd, b_sd, tmp_path):
    outcome = linear_merge("amp", [tiny_a, tiny_b], tmp_path / "out.safetensors", weight=2.0)
    expected: dict[str, list[float]] = {}
    for key, a in a_sd.items():
        if key.startswith(UNET):
            rest = key[len(UNET):].split(".")
            block = ".".join(rest[:2]) if rest[0] in ("input_blocks", "output_blocks") else rest[0]
            entry = expected.setdefault(block, [0.0, 0.0])
            entry[0] += float(((b_sd[key].double() - a.double()) ** 2).sum())
            entry[1] = max(entry[1], float((2 * b_sd[key].double() - a.double()).abs().max()))
    blocks = {b["block"]: b for b in outcome.report["blocks"]}
    assert set(blocks) == set(expected)
    for name, (diff_sq, max_abs) in expected.items():
        assert blocks[name]["diff_norm"] == pytest.approx(math.sqrt(diff_sq), rel=1e-4), name
        assert blocks[name]["max_abs"] == pytest.approx(max_abs, rel=1e-6), name
    order = [b["block"] for b in outcome.report["blocks"]]
    assert order[:3] == ["time_embed", "label_emb", "input_blocks.0"] and order[-1] == "out"
    assert order.index("middle_block") == order.index("output_blocks.0") - 1


# --- jobs and CLI --------------------------------------------------------------------------------------------------

def test_jobs_methods_and_unavailable_ones(tiny_a, tiny_b, tmp_path):
    assert {k: m.label for k, m in jobs.METHODS.items()} == {
        "amp": "Amplified difference", "add-diff": "Add difference", "weighted-sum": "Weighted sum",
        "rebasin": "Re-Basin", "basin-sum": "BasinSum", "amp-rebasin": "Amplify → Re-Basin",
        "merge-many": "MergeMany"}
    assert jobs.METHODS["add-diff"].n_models == 3 and jobs.METHODS["merge-many"].n_models is None
    assert jobs.METHODS["amp"].formula.format(M=2, alpha=0.5) == "A + 2·(B − A)"
    unavailable = [k for k in jobs.METHODS if k not in jobs.RUNNERS]
    for key in unavailable:
        with pytest.raises(ValueError, match=f"method {key} is not available yet"):
            jobs.run(jobs.MergeRequest(key, [str(tiny_a), str(tiny_b)], str(tmp_path / "x.safetensors")))
    with pytest.raises(ValueError, match="unknown method"):
        jobs.run(jobs.MergeRequest("slerp", [str(tiny_a), str(tiny_b)], str(tmp_path / "x.safetensors")))
    with pytest.raises(ValueError, match="takes 3 models"):
        jobs.run(jobs.MergeRequest("add-diff", [str(tiny_a), str(tiny_b)], str(tmp_path / "x.safetensors")))
    result = jobs.run(jobs.MergeRequest("weighted-sum", [str(tiny_a), str(tiny_b)], str(tmp_path / "ws.safetensors"),
                                        alpha=0.25))
    assert result.path == str(tmp_path / "ws.safetensors") and result.bytes == (tmp_path / "ws.safetensors").stat().st_size
    assert result.report["formula"] == "(1 − 0.25)·A + 0.25·B" and result.seconds > 0
    assert written_files(tmp_path) == ["ws.safetensors"]


def test_default_output_name():
    request = jobs.MergeRequest("amp", ["/m/my model (v2).safetensors", "/m/other.ckpt"], "")
    assert jobs.default_output_name(request) == "amp_M2_my_model_v2_other.safetensors"
    request = jobs.MergeRequest("weighted-sum", ["a.safetensors", "b.safetensors"], "", alpha=0.3)
    assert jobs.default_output_name(request) == "weightedsum_a0.3_a_b.safetensors"
    request = jobs.MergeRequest("add-diff", ["a.safetensors", "b.safetensors", "c.safetensors"], "", multiplier=-1.5)
    assert jobs.default_output_name(request) == "adddiff_M-1.5_a_b_c.safetensors"
    request = jobs.MergeRequest("merge-many", [f"m{i}.safetensors" for i in range(5)], "", seed=3)
    assert jobs.default_output_name(request) == "mergemany_s3_m0_m1_3more.safetensors"


def test_cli_merges_report_and_errors(tiny_a, tiny_b, tiny_c, tmp_path, capsys):
    for command in ("amp", "add-diff", "weighted-sum"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    out = tmp_path / "amp.safetensors"
    assert main(["amp", str(tiny_a), str(tiny_b), "-M", "2", "-o", str(out), "--components", "clip=a"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == str(out)
    assert "input_blocks.4" in printed and "CLIP-L" in printed
    merged, a = load_file(out), load_file(tiny_a)
    key = "conditioner.embedders.1.model.token_embedding.weight"
    assert torch.equal(merged[key], a[key])  # clip=a

    assert main(["weighted-sum", str(tiny_a), str(tiny_b), "--alpha", "0.4", "--json", "--dtype", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"].endswith("weightedsum_a0.4_tiny_a_tiny_b.safetensors")
    assert result["report"]["output_dtype"] == "bf16"
    (tmp_path / "default").mkdir()
    shutil.move(result["path"], tmp_path / "default")

    assert main(["add-diff", str(tiny_a), str(tiny_b), str(tiny_c), "-M", "1", "-o",
                 str(tmp_path / "ad.safetensors"), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ad.safetensors")

    save_file(sd15_state_dict(), tmp_path / "sd15.safetensors")
    assert main(["amp", str(tiny_a), str(tmp_path / "sd15.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "SD1.x" in capsys.readouterr().err
    assert main(["amp", str(tiny_a), str(tiny_b), "--components", "unet", "-o", str(tmp_path / "y.safetensors")]) == 2
    assert "COMPONENT=SOURCE" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_read_ahead_spans_point_at_the_tensors(tiny_a, a_sd):
    """Read-ahead asks for file spans from the header's offsets: they must hold exactly each tensor's bytes."""
    raw = open(tiny_a, "rb").read()
    with Checkpoint(tiny_a) as ckpt:
        for key, info in ckpt.infos.items():
            assert raw[info.offset:info.offset + info.nbytes] == bits(a_sd[key]).numpy().tobytes(), key
        ckpt.prefetch(ckpt.keys())  # a background read of the whole data section; close() ends it
