"""Reading and writing checkpoints: bit-exact round trips, atomic writes, refusals, corrupt input."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch

from lib_rebasin.checkpoint import Checkpoint, CheckpointError, SafetensorsWriter, TensorInfo, save_state_dict

ROUND_TRIP_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool,
                     torch.float8_e4m3fn, torch.float8_e5m2]


def sample(dtype: torch.dtype, shape=(5, 7), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, shape, generator=g)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=str)
def test_round_trip_is_bit_exact_and_readable_by_safetensors(tmp_path, dtype):
    tensors = {"matrix": sample(dtype), "scalar": sample(dtype, ()), "empty": sample(dtype, (0,)),
               "vector": sample(dtype, (13,), seed=1)}
    path = save_state_dict(tmp_path / "x.safetensors", tensors, {"note": "hi", "nested": {"a": 1}})
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert same_bits(loaded[key], tensor), key
    with Checkpoint(path) as ckpt:
        for key, tensor in tensors.items():
            assert same_bits(ckpt.get(key), tensor)
        assert ckpt.metadata == {"note": "hi", "nested": json.dumps({"a": 1})}


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {"a": sample(torch.float16), "b": sample(torch.int64)}
    safetensors.torch.save_file(tensors, tmp_path / "ref.safetensors", metadata={"k": "v"})
    with Checkpoint(tmp_path / "ref.safetensors") as ckpt:
        assert ckpt.metadata == {"k": "v"}
        assert ckpt.infos["a"].shape == (5, 7) and ckpt.infos["b"].dtype == torch.int64
        assert same_bits(ckpt.get("a"), tensors["a"])


def test_writer_refuses_existing_file_unless_allowed(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        save_state_dict(out, {"a": torch.zeros(2)})
    assert out.read_bytes() == b"precious"
    save_state_dict(out, {"a": torch.zeros(2)}, overwrite=True)
    assert safetensors.torch.load_file(out)["a"].shape == (2,)


def test_writer_refuses_to_overwrite_an_input_even_when_overwrite_is_allowed(tmp_path):
    src = save_state_dict(tmp_path / "in.safetensors", {"a": torch.ones(3)})
    before = src.read_bytes()
    with pytest.raises(CheckpointError, match="input"):
        save_state_dict(src, {"a": torch.zeros(3)}, inputs=[src], overwrite=True)
    link = tmp_path / "alias.safetensors"
    os.symlink(src, link)
    with pytest.raises(CheckpointError, match="input"):
        save_state_dict(link, {"a": torch.zeros(3)}, inputs=[src], overwrite=True)
    assert src.read_bytes() == before


def test_error_midway_leaves_no_file(tmp_path):
    out = tmp_path / "out.safetensors"
    infos = {"a": TensorInfo((4,), torch.float32), "b": TensorInfo((4,), torch.float32)}
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(out, infos) as writer:
            writer.write("a", torch.zeros(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_no_file(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(out, {"a": TensorInfo((4,), torch.float32)}):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_mismatched_writes_are_refused(tmp_path):
    infos = {"a": TensorInfo((4,), torch.float32), "b": TensorInfo((2,), torch.float16)}
    with pytest.raises(CheckpointError, match="only 1 of 2"):
        with SafetensorsWriter(tmp_path / "x.safetensors", infos) as writer:
            writer.write("a", torch.zeros(4))
    with pytest.raises(CheckpointError, match="out of order"):
        with SafetensorsWriter(tmp_path / "x.safetensors", infos) as writer:
            writer.write("b", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(CheckpointError, match="header says"):
        with SafetensorsWriter(tmp_path / "x.safetensors", infos) as writer:
            writer.write("a", torch.zeros(4, dtype=torch.float64))
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_safetensors_in_an_existing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="safetensors"):
        save_state_dict(tmp_path / "x.ckpt", {"a": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not exist"):
        save_state_dict(tmp_path / "missing" / "x.safetensors", {"a": torch.zeros(1)})


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointError, match="free disk space"):
        save_state_dict(tmp_path / "x.safetensors", {"a": torch.zeros(1000)})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_the_file(tmp_path):
    path = save_state_dict(tmp_path / "x.safetensors", {"a": torch.zeros(1000)})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        Checkpoint(truncated)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}",
                                     struct.pack("<Q", 4) + b"nope", struct.pack("<Q", 2) + b"[]"])
def test_corrupt_headers_name_the_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        Checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nothing.safetensors")


def test_ckpt_with_plain_tensors_loads(tmp_path):
    state = {"state_dict": {"model.w": torch.arange(6.0).reshape(2, 3), "pos": torch.arange(4)}}
    torch.save(state, tmp_path / "m.ckpt")
    with Checkpoint(tmp_path / "m.ckpt") as ckpt:
        assert sorted(ckpt.keys()) == ["model.w", "pos"]
        assert torch.equal(ckpt.get("model.w"), state["state_dict"]["model.w"])


class Payload:
    """Unpickling this runs a command that leaves a marker file: the attack a weights-only load must stop."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    # The payload is real: an unrestricted unpickle runs it.
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Payload(tmp_path / "control"), f)
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "control").exists()

    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*refused"):
        Checkpoint(path)
    assert not marker.exists()


def test_truncated_ckpt_names_the_file(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "ok.ckpt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt"):
        Checkpoint(tmp_path / "cut.ckpt")
