"""Where a run's work happens: in this process (`LocalExecutor`) or on a Ray cluster (`RayExecutor`).

Both run the same tasks in the same order of results, so the output does not depend on which
ran them or how many workers there were:

- blocks of a calibration-free run are independent tasks (`map_blocks`): each reads its
  block's tensors from the checkpoint, quantizes them and returns them; the driver writes
  them in block order as they come;
- a calibrated run keeps the calibration batches with workers that each hold some of them
  (`start_worker`); see `llmquant.host.distributed`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from llmquant.errors import LlmquantError

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "make_executor"]

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")

T = TypeVar("T")
A = TypeVar("A")


class Executor(Protocol):
    """Runs a run's tasks; results come back in the order the tasks were given."""

    name: str
    workers: int

    def map_blocks(self, task: Callable[[Any, A], T], shared: Any, items: Sequence[A]) -> Iterator[T]:
        """Run ``task(shared, item)`` for every item, at most a few more in flight than workers,
        and yield the results in item order."""

    lost: tuple[type[BaseException], ...]  # what `get` raises when a worker's process or node is gone

    def start_worker(self, spec: Any) -> Any:
        """Start a `CalibrationWorker` for `spec`; its methods return handles that `get` resolves."""

    def get(self, handles: list[Any]) -> list[Any]:
        """The results of a list of handles."""

    def close(self) -> None:
        """Release the workers."""


class LocalExecutor:
    """This process: `workers` threads for independent tasks (torch releases the GIL in its kernels,
    and reading the next block overlaps quantizing this one)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1

    def map_blocks(self, task: Callable[[Any, A], T], shared: Any, items: Sequence[A]) -> Iterator[T]:
        if self.workers == 1:
            for item in items:
                yield task(shared, item)
            return
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="llmquant-block") as pool:
            yield from _in_order((pool.submit(task, shared, item) for item in items), self.workers + 1,
                                 lambda future: future.result())

    lost: tuple[type[BaseException], ...] = ()  # a worker in this process is lost only with the process

    def start_worker(self, spec: Any) -> Any:
        from llmquant.host.distributed import CalibrationWorker

        return CalibrationWorker(spec)

    def get(self, handles: list[Any]) -> list[Any]:
        return handles

    def close(self) -> None:
        pass


class RayExecutor:
    """A Ray cluster: an existing one at `address` ("auto" for the one this machine belongs to), or
    a local one started for the run with `workers` CPUs.

    Workers read the checkpoint by its path, so on a cluster of several machines the model folder
    and the output's parent must be on storage every node mounts at the same path.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        ray = _import_ray()
        self._started = False
        if not ray.is_initialized():
            if address and address != "auto":
                _check_reachable(address)
            try:
                if address:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                else:
                    ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise LlmquantError(f"--ray-address {address or '(a local cluster)'}: cannot connect to Ray ({exc}); "
                                    f"start a cluster with `ray start --head` and pass its address, or omit "
                                    f"--ray-address to start a local one") from exc
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or cpus
        log.info("ray: %d workers on a cluster of %d CPUs", self.workers, cpus)
        self._ray = ray
        self._actors: list[Any] = []
        errors = ray.exceptions
        self.lost: tuple[type[BaseException], ...] = (errors.RayActorError, errors.ActorUnavailableError, errors.ObjectLostError, errors.NodeDiedError)

    def map_blocks(self, task: Callable[[Any, A], T], shared: Any, items: Sequence[A]) -> Iterator[T]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=3)(task)
        shared_ref = ray.put(shared)
        yield from _in_order((remote.remote(shared_ref, item) for item in items), self.workers + 1, ray.get)

    def start_worker(self, spec: Any) -> Any:
        from llmquant.host.distributed import CalibrationWorker

        actor = self._ray.remote(num_cpus=1, max_restarts=0)(CalibrationWorker).options(scheduling_strategy="SPREAD")
        self._actors.append(actor.remote(spec))
        return _RemoteCalls(self._actors[-1])

    def get(self, handles: list[Any]) -> list[Any]:
        return list(self._ray.get(handles))

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False


class _RemoteCalls:
    """An actor whose method calls return Ray object refs: ``worker.collect(g)`` is ``actor.collect.remote(g)``."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._actor, name)
        return lambda *args: method.remote(*args)


def make_executor(kind: str, *, address: str | None = None, workers: int | None = None) -> LocalExecutor | RayExecutor:
    """The executor a run's settings ask for."""
    if workers is not None and workers < 1:
        raise LlmquantError(f"--workers {workers}: give at least 1")
    if kind == "local":
        if address:
            raise LlmquantError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise LlmquantError(f"--executor {kind!r}: use one of {', '.join(EXECUTORS)}")


def _in_order(pending: Iterator[Any], window: int, result: Callable[[Any], T]) -> Iterator[T]:
    """Keep `window` submitted tasks in flight and yield their results in submission order."""
    queue: deque[Any] = deque()
    for handle in pending:
        queue.append(handle)
        if len(queue) >= window:
            yield result(queue.popleft())
    while queue:
        yield result(queue.popleft())


def _check_reachable(address: str) -> None:
    """Fail in seconds, with one line, where Ray would retry an unreachable cluster for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LlmquantError(f"--ray-address {address!r}: give HOST:PORT (the head's GCS port, 6379 by default), "
                            f"ray://HOST:PORT (Ray Client, 10001) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise LlmquantError(f"--ray-address {address}: cannot connect to Ray ({exc.strerror or exc}); start a cluster with "
                            f"`ray start --head` and pass its address, or omit --ray-address to start a local one") from exc


def _import_ray() -> Any:
    from llmquant.deps import require

    return require("ray", extra="ray", purpose="--executor ray")
