"""Helpers of the calibrated pass: worker threads that take turns, and returning freed memory."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Stop", "Worker", "bound_onednn_cache", "release", "return_freed_memory", "share_malloc_arena"]

ONEDNN_CACHE_ENTRIES = 64


class Stop(Exception):
    """Raised by a hook to end a forward pass early, once what it needed has been seen."""


def share_malloc_arena() -> None:
    """Make new threads allocate from the main malloc arena (glibc's M_ARENA_MAX = 1).

    The worker threads take turns, so they gain nothing from arenas of their own, and every extra
    arena holds freed pages that raise resident memory.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def bound_onednn_cache() -> None:
    """Cap the caches torch keeps per matmul shape on CPU at `ONEDNN_CACHE_ENTRIES` entries each
    (unless the user set them): oneDNN's primitive cache and ideep's, 1024 entries by default.

    torch runs bfloat16 Linears on CPU through ideep/oneDNN, which keep a compiled primitive (about
    0.3 MB) per input shape. Routed experts see a different token count in every batch, block and
    expert, so without a cap resident memory grew by about 38 MB per block on an 8-expert model;
    dense blocks repeat a handful of shapes and keep them all. Both libraries read the setting
    when they build their first primitive, so this is a no-op after one was built.
    """
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(ONEDNN_CACHE_ENTRIES))


def return_freed_memory(collect: bool = True) -> None:
    """Collect reference cycles (with `collect`), then ask glibc to give freed heap pages back to the OS.

    Worker threads and early-stopped forward passes leave reference cycles (frames holding
    activations) that Python's collector would free only later, and glibc keeps freed pages
    mapped; without this, resident memory creeps up over the first blocks. A full collection
    costs about 0.3 s once transformers is imported, so paths without calibration, whose
    tensors are freed by reference counting, skip it.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release(model: nn.Module, name: str) -> None:
    """Put parameter `name` back on the meta device, freeing its memory (buffers are kept)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))


class Worker(threading.Thread):
    """Runs one batch's forward pass in turns with the main thread (a coroutine on a thread).

    `step()` (main thread) lets the worker run until it parks in a hook or finishes; `park()`
    (worker thread, inside a hook) hands control back and waits for the next turn.
    """

    def __init__(self, forward: Callable[[], Tensor], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.forward = forward
        self.next_group = 0
        self.result: Tensor | None = None
        self.error: BaseException | None = None
        self._turn = threading.Semaphore(0)
        self._parked = threading.Semaphore(0)
        self._aborted = False
        self._finished = False

    def run(self) -> None:
        self._turn.acquire()
        try:
            if not self._aborted:
                with torch.no_grad():  # grad mode is per thread
                    self.result = self.forward()
        except Stop:
            pass
        except BaseException as exc:  # handed to the main thread by step()
            self.error = exc
        finally:
            self._finished = True
            self._parked.release()

    def park(self) -> None:
        self._parked.release()
        self._turn.acquire()
        if self._aborted:
            raise Stop

    def step(self) -> None:
        if self._finished:
            raise RuntimeError(f"{self.name} finished before reaching every sequential group")
        self._turn.release()
        self._parked.acquire()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Let a parked or unstarted worker end (raising Stop in its hook)."""
        if not self._finished and self.is_alive():
            self._aborted = True
            self._turn.release()
            self.join()
