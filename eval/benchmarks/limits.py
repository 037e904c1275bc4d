"""Run a command and measure what it cost: wall time, peak memory, and whether a hard memory limit killed it.

Peak memory is watched from outside, so a child that is killed still has a peak: the parent samples
``/proc/<pid>/status`` of the child and its descendants (``VmRSS`` and its anonymous part
``RssAnon``) every ``interval`` seconds. File pages a process maps (safetensors reads through
mmap) count in ``VmRSS`` but are page cache the kernel can drop at any time; ``RssAnon`` is the
memory the process really holds. A sampled peak can miss a spike shorter than the interval, so
the child's own high-water mark (``VmHWM``, which the child may print) is the exact figure when
it finishes.

The hard limit is a cgroup v1 memory group (``/sys/fs/cgroup/memory``, root only): the limit is
written to ``memory.limit_in_bytes`` and the child joins the group before it execs. Past the
limit the kernel first drops the group's page cache, then kills the process (exit -9 / 137).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Measured", "MemoryCgroup", "can_limit_memory", "run_measured"]

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1024 * 1024


@dataclass
class Measured:
    """What one command cost."""

    returncode: int
    seconds: float
    peak_rss_mb: float  # sampled peak of VmRSS summed over the process tree
    peak_anon_mb: float  # sampled peak of RssAnon summed over the process tree
    limit_mb: float | None
    cgroup_peak_mb: float | None  # memory.max_usage_in_bytes: anonymous memory plus page cache
    oom_killed: bool
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit; processes join it with :meth:`join`."""

    def __init__(self, limit_mb: float, name: str | None = None) -> None:
        if not (CGROUP_ROOT / "cgroup.procs").exists():
            raise RuntimeError(f"no cgroup v1 memory controller at {CGROUP_ROOT}: run without a memory limit")
        self.path = CGROUP_ROOT / (name or f"llmquant-bench-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self.path.mkdir()
        except PermissionError as error:
            raise RuntimeError(f"cannot create {self.path} (needs root): run without a memory limit") from error
        self.limit_mb = limit_mb
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_mb * MB)))
        except OSError:
            self.path.rmdir()
            raise

    def join(self) -> None:
        """Move the calling process into the group (used as ``preexec_fn``, in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) / MB

    def oom_kills(self) -> int:
        """Processes the kernel killed in this group; kernels without that counter: 1 if the limit was ever hit."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int(int((self.path / "memory.failcnt").read_text()) > 0)

    def remove(self) -> None:
        for _ in range(50):  # the group empties a moment after its last process exits
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def can_limit_memory() -> bool:
    """Whether this process may create a memory cgroup here (root, cgroup v1 memory controller, writable)."""
    try:
        MemoryCgroup(1024, name=f"llmquant-probe-{os.getpid()}").remove()
        return True
    except (RuntimeError, OSError):
        return False


def _tree(pid: int) -> list[int]:
    """Return `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _resident_mb(pids: list[int]) -> tuple[float, float]:
    """Return (VmRSS, RssAnon) in MiB summed over `pids`."""
    rss = anon = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
    return rss / 1024, anon / 1024


def run_measured(command: list[str], *, memory_limit_mb: float | None = None, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, interval: float = 0.2, timeout: float | None = None) -> Measured:
    """Run `command` to completion (optionally under a hard memory limit) and return what it cost."""
    group = MemoryCgroup(memory_limit_mb) if memory_limit_mb else None
    peaks = [0.0, 0.0]
    try:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                   preexec_fn=group.join if group else None)
        done = threading.Event()

        def watch() -> None:
            tick = 0
            pids = [process.pid]
            while not done.is_set():
                if tick % 25 == 0:  # the process tree changes rarely; walking /proc is not free
                    pids = _tree(process.pid)
                rss, anon = _resident_mb(pids)
                peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], anon)
                tick += 1
                done.wait(interval)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        stdout, stderr = process.communicate(timeout=timeout)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        cgroup_peak = group.peak_mb() if group else None
        oom = bool(group and process.returncode in (-9, 137) and group.oom_kills() > 0)
    finally:
        if group:
            group.remove()
    return Measured(process.returncode, seconds, peaks[0], peaks[1], memory_limit_mb, cgroup_peak, oom, stdout, stderr)
