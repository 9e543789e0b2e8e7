"""Writing a checkpoint whose tensors are computed on the fly, in one sequential pass with bounded memory.

A coordinator thread walks the output keys in order: it lays each computed tensor out in one of two reusable
buffers and hands its computation, cut into pieces of at most PIECE elements, to a small pool of worker
threads.  The calling thread writes the tensors in order as soon as their pieces are done and hands a buffer
back once all of its tensors are written.  So reading (page faults in the workers), computing (torch ops,
which release the GIL) and writing overlap; memory is the two buffers.  Cancelling (monitor.check) or any
error stops the coordinator and the workers before the exception leaves `stream`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .checkpoint import SafetensorsWriter, TensorInfo
from .progress import Monitor

BUFFER_BYTES = 64 << 20
PIECE = 1 << 22
MAX_WORKERS = 4

Fill = Callable[[torch.Tensor, int, int], object]


@dataclass
class Item:
    """One output tensor: either `tensor`, written as it is, or computed by `fill(out, start, stop)`, which
    fills out[start:stop] of the flat output tensor and returns a result for that range (e.g. statistics)."""
    key: str
    info: TensorInfo
    tensor: torch.Tensor | None = None
    fill: Fill | None = None
    context: object = None


def default_workers(device: torch.device) -> int:
    """Compute threads: one per core but one (the writer and the kernel's I/O need a core), at most
    MAX_WORKERS (the disk is the limit beyond that); one for a GPU, which computes by itself."""
    if device.type != "cpu":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus - 1))


class _Stopped(Exception):
    pass


class _Coordinator:
    def __init__(self, items: Iterable[Item], capacity: int, pool: concurrent.futures.Executor):
        self.items, self.capacity, self.pool = items, capacity, pool
        self.stop = threading.Event()
        self.ready: queue.Queue = queue.Queue(maxsize=4096)
        self.free: queue.Queue = queue.Queue()
        self.buffers_made = 0
        self.thread = threading.Thread(target=self._run, name="lib_rebasin-stream", daemon=True)

    def _put(self, entry) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                return self.ready.put(entry, timeout=0.1)
        raise _Stopped

    def _take_buffer(self) -> torch.Tensor:
        if self.buffers_made < 2:  # made when first needed: a job without computed tensors needs none
            self.buffers_made += 1
            return torch.empty(self.capacity, dtype=torch.uint8)
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self.free.get(timeout=0.1)
        raise _Stopped

    def _run(self) -> None:
        try:
            self._coordinate()
            self._put(None)
        except _Stopped:
            pass
        except BaseException as e:  # raised again in the writing thread
            with contextlib.suppress(_Stopped):
                self._put(e)

    def _coordinate(self) -> None:
        buffer, used = None, 0
        for item in self.items:
            if self.stop.is_set():
                raise _Stopped
            if item.fill is None:
                self._put((item, item.tensor, ()))
                continue
            size = item.info.nbytes
            if size > self.capacity:
                raise ValueError(f"{item.key}: {size} bytes do not fit the stream buffers ({self.capacity})")
            if buffer is None or used + size > self.capacity:
                if buffer is not None:
                    self._put(buffer)
                buffer, used = self._take_buffer(), 0
            out = buffer[used:used + size].view(item.info.dtype).view(item.info.shape)
            used += -(-size // 64) * 64  # keep every tensor aligned
            flat = out.view(-1)
            futures = [self.pool.submit(item.fill, flat, start, min(start + PIECE, flat.numel()))
                       for start in range(0, flat.numel(), PIECE)]
            self._put((item, out, futures))
        if buffer is not None:
            self._put(buffer)


def stream(writer: SafetensorsWriter, items: Iterable[Item], *, largest: int, workers: int, monitor: Monitor,
           on_written: Callable[[Item, list], None] | None = None, progress_end: float = 1.0) -> None:
    """Write every item into the open `writer`, in order.

    Args:
        largest: bytes of the largest computed tensor (the buffers are at least that big).
        workers: compute threads.
        on_written: called in this thread after each tensor is written, with the item and its fill results.
        progress_end: the fraction reported once everything is written.
    """
    total = max(sum(info.nbytes for info in writer.infos.values()), 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lib_rebasin-compute") as pool:
        coordinator = _Coordinator(items, max(BUFFER_BYTES, largest), pool)
        coordinator.thread.start()
        try:
            done, last = 0, 0.0
            while (entry := coordinator.ready.get()) is not None:
                if isinstance(entry, BaseException):
                    raise entry
                if isinstance(entry, torch.Tensor):  # every tensor in this buffer is written
                    coordinator.free.put(entry)
                    continue
                item, tensor, futures = entry
                results = [f.result() for f in futures]
                monitor.check()
                writer.write(item.key, tensor)
                if on_written is not None:
                    on_written(item, results)
                done += item.info.nbytes
                if (now := time.monotonic()) - last > 0.05:
                    monitor.report(progress_end * done / total, item.key)
                    last = now
        finally:
            coordinator.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            while coordinator.thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    coordinator.ready.get(timeout=0.05)
            coordinator.thread.join()
