"""The one place that touches checkpoint files: lazy reading and the streaming, atomic safetensors writer.

Reading never holds a whole model: safetensors tensors come one at a time from a memory map, and a
`.ckpt`/`.pt` is loaded only through `torch.load(weights_only=True)` (memory-mapped unless it is the legacy
non-zip format), which refuses any pickle that needs more than tensors and plain containers.  What a file
holds is decided by its first bytes, not its extension (renamed files are common).  Writing streams tensors through the output guard
(`outputs.py`): a temporary file beside the target, committed only when complete, so a failed or cancelled job
never leaves a partial output.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import queue
import stat
import struct
import threading
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import CheckpointError, file_error
from .outputs import OutputFile, check_free_space, check_output_path

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


class TensorInfo:
    __slots__ = ("shape", "dtype", "offset")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, offset: int | None = None):
        self.shape, self.dtype = shape, dtype
        self.offset = offset  # where the data starts in its safetensors file, if read from one

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)

    def __repr__(self) -> str:
        return f"TensorInfo({self.shape}, {self.dtype})"


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensors, metadata, size of the data section)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {header_len} bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise file_error(e, path) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is a JSON "
                              f"{_json_kind(metadata)}, not an object of strings")
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r:.200}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r:.200}")
        info = TensorInfo(shape, dtype, 8 + header_len + begin)
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
        data_end = max(data_end, end)
        tensors[key] = info
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(f"{path}: truncated: tensors need {data_end} bytes of data, "
                              f"file has {available} (an interrupted download or copy?)")
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data_end


def _json_kind(value: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


def _sniff(path: Path) -> str:
    """What a file holds, by its first bytes: 'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save)
    or 'unknown'.  Files are often renamed, so the content decides, not the extension."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle's PROTO opcode
        return "pickle"
    return "unknown"


class Checkpoint:
    """A checkpoint opened for lazy reading. Use as a context manager, or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            mode = os.stat(self.path).st_mode
            if stat.S_ISDIR(mode):
                raise CheckpointError(f"{self.path}: is a folder, not a checkpoint file")
            if not stat.S_ISREG(mode):
                raise CheckpointError(f"{self.path}: not a regular file (a device, pipe or socket)")
            kind = _sniff(self.path)
        except OSError as e:
            if isinstance(e, FileNotFoundError) and os.path.islink(self.path):
                raise CheckpointError(f"{self.path}: a symbolic link to a file that does not exist") from None
            raise file_error(e, self.path) from None
        self._state_dict: dict[str, torch.Tensor] | None = None
        self._handle = None
        self._prefetcher: _Prefetcher | None = None
        if kind in ("zip", "pickle") or (kind == "unknown" and self.path.suffix.lower() in PICKLE_SUFFIXES):
            self._state_dict = _load_pickle(self.path, zipped=kind == "zip")
            self.infos = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in self._state_dict.items()}
            self.metadata: dict[str, str] = {}
        else:
            self.infos, self.metadata, _ = read_safetensors_header(self.path)
            from safetensors import safe_open
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path}: cannot open as safetensors ({e})") from None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle = None
        self._state_dict = None
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self.infos.items()}

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def prefetch(self, keys: Iterable[str]) -> None:
        """Start reading the span of the file that holds these tensors into the page cache, in a background
        thread, and return at once. One call for many neighbouring keys makes one sequential read; reading
        ahead this way keeps the disk busy while the tensors before them are used (an OS hint such as
        posix_fadvise(WILLNEED) measured a third slower here, its pages being reclaimed before use)."""
        if self._handle is None:
            return
        spans = [(info.offset, info.offset + info.nbytes) for info in map(self.infos.__getitem__, keys)]
        if spans:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self.path)
            self._prefetcher.request(min(s for s, _ in spans), max(e for _, e in spans))

    def get(self, key: str) -> torch.Tensor:
        """The tensor for `key`. Safetensors tensors are memory-mapped views: never modify them in place."""
        if self._state_dict is not None:
            return self._state_dict[key]
        if self._handle is None:
            raise CheckpointError(f"{self.path}: read after close")
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({e})") from None


class _Prefetcher:
    """Reads requested spans of a file, in order, in a background thread (errors are ignored: a hint only)."""
    BLOCK = 8 * 1024 * 1024

    def __init__(self, path: Path):
        self._spans: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), name="lib_rebasin-prefetch", daemon=True)
        self._thread.start()

    def request(self, start: int, end: int) -> None:
        self._spans.put((start, end))

    def close(self) -> None:
        self._stop.set()
        self._spans.put(None)
        self._thread.join()

    def _run(self, path: Path) -> None:
        block = bytearray(self.BLOCK)
        view = memoryview(block)
        try:
            with open(path, "rb", buffering=0) as f:
                while (span := self._spans.get()) is not None:
                    start, end = span
                    f.seek(start)
                    while start < end and not self._stop.is_set():
                        n = f.readinto(view[:min(self.BLOCK, end - start)])
                        if not n:
                            break
                        start += n
        except OSError:
            pass


def _load_pickle(path: Path, zipped: bool) -> dict[str, torch.Tensor]:
    """A torch.save file through the weights-only unpickler (memory-mapped when it is the zip format; the
    legacy format cannot be mapped and is read into memory)."""
    if path.suffix.lower() == ".safetensors":  # torch.load would hand the file to safetensors by its name
        raise CheckpointError(f"{path}: not a safetensors file: it holds a PyTorch pickle (torch.save); "
                              f"rename it to .ckpt to use it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "Unsupported class" not in str(e):
            raise CheckpointError(f"{path}: corrupt or not a checkpoint ({_pickle_detail(e)})") from None
        raise CheckpointError(
            f"{path}: refused: this pickle needs more than tensors to load, and running its code could "
            f"be unsafe. Convert it to .safetensors with a tool you trust. ({_pickle_detail(e)})") from None
    except OSError as e:
        raise file_error(e, path) from None
    except Exception as e:  # torch's readers fail in many ways on a truncated file or one that is no checkpoint
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_pickle_detail(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _pickle_detail(error: Exception) -> str:
    """The informative line of torch.load's error (its first paragraph is a general note on weights_only)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0][:200] if lines else type(error).__name__


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def metadata_strings(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata holds strings only: serialise everything else as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


class SafetensorsWriter:
    """Streams tensors into a new safetensors file whose header is known up front.

        with SafetensorsWriter(out, {key: TensorInfo(shape, dtype), ...}, metadata, inputs=[a, b]) as w:
            for key in w.keys: w.write(key, tensor)

    Tensors must be written in header order.  The file goes through the output guard (`outputs.OutputFile`):
    `out` is a path, checked here, or an OutputFile a job created (and perhaps opened) before its expensive
    part.  On success the file is flushed and committed; on any error, cancellation or interruption the
    temporary file is removed and nothing appears.
    """

    def __init__(self, path: str | os.PathLike | OutputFile, infos: Mapping[str, TensorInfo],
                 metadata: Mapping[str, object] | None = None, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, check_space: bool = True, metadata_room: int = 0,
                 suffixes: tuple[str, ...] = (".safetensors",)):
        self.infos = dict(infos)
        self.keys = list(self.infos)
        raw = self._header_json(metadata)
        raw += b" " * (metadata_room + (-(len(raw) + metadata_room) % 8))
        self._header = struct.pack("<Q", len(raw)) + raw
        self.size = safetensors_size(self.infos, len(raw))
        if isinstance(path, OutputFile):
            self.output = path
            if check_space and path.tmp is None:
                check_free_space(path.path.parent, self.size, path.path)
        else:
            self.output = OutputFile(path, inputs=inputs, overwrite=overwrite, size=self.size if check_space else 0,
                                     suffixes=suffixes)
        self.path = self.output.path
        self._next = 0

    def _header_json(self, metadata: Mapping[str, object] | None) -> bytes:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata_strings(metadata)
        offset = 0
        for key, info in self.infos.items():
            header[key] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                           "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        return json.dumps(header, separators=(",", ":")).encode()

    def set_metadata(self, metadata: Mapping[str, object]) -> None:
        """Rewrite the metadata of the header already written, for values known only at the end (such as
        hashes computed during the write). It must fit the header's size: reserve room with `metadata_room`."""
        raw = self._header_json(metadata)
        room = len(self._header) - 8
        if len(raw) > room:
            raise CheckpointError(f"{self.path}: new metadata needs {len(raw) - room} bytes more than reserved")
        self.output.seek(8)
        self.output.write(raw + b" " * (room - len(raw)))
        self.output.seek(0, os.SEEK_END)

    def __enter__(self) -> "SafetensorsWriter":
        self.output.open()
        try:
            self.output.write(self._header)
        except BaseException:
            self.output.discard()
            raise
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.keys) or self.keys[self._next] != key:
            expected = self.keys[self._next] if self._next < len(self.keys) else "nothing"
            raise CheckpointError(f"{self.path}: wrote {key!r} out of order (expected {expected})")
        info = self.infos[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointError(f"{self.path}: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"header says {info.shape} {info.dtype}")
        if info.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self.output.write(data.numpy())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.output.discard()
            return
        if self._next != len(self.keys):
            self.output.discard()
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self.keys)} tensors written")
        self.output.commit()


def safetensors_size(infos: Mapping[str, TensorInfo], header_bytes: int = 64 << 10) -> int:
    """Bytes of a safetensors file with these tensors (the header's size estimated when not given)."""
    return 8 + header_bytes + sum(info.nbytes for info in infos.values())


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, object] | None = None, **options) -> Path:
    """Write a small in-memory state dict through the streaming writer (tests, tools)."""
    infos = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with SafetensorsWriter(path, infos, metadata, **options) as writer:
        for key in writer.keys:
            writer.write(key, tensors[key])
    return writer.path
