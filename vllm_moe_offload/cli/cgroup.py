"""A fresh memory cgroup with a limit, to run an engine under it (v1 or v2, whichever the machine has).

For ``vllm-moe-offload bench --memory-limit``, ``scripts/measure/`` and the
tests: the page cache counts against the limit as it does on a real box, and
the cgroup reports the peak memory of all its processes and whether the kernel
killed one for memory. It is made under this process's own memory cgroup,
which needs root (or a delegated cgroup tree). :func:`run_limited` runs one
command in such a cgroup and says how it ended, its peak, and the peak
resident memory of each of its processes (sampled).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vllm_moe_offload.runtime.memory_limit import own_memory_cgroup


@dataclass
class MemoryCgroup:
    folder: Path
    version: int

    #: why :meth:`make` returned None
    CANNOT = ("no memory cgroup can be made here: it needs root (or a delegated cgroup tree) and a cgroup v1 "
              "memory controller or a cgroup v2 tree under /sys/fs/cgroup")

    @classmethod
    def make(cls, limit_bytes: int) -> MemoryCgroup | None:
        """A child of this process's own memory cgroup limited to ``limit_bytes``; None where not allowed."""
        own = own_memory_cgroup()
        if own is None:
            return None
        parent, version = own
        box = cls(parent / f"moe-offload-{uuid.uuid4().hex[:8]}", version)
        try:
            box.folder.mkdir()
            (box.folder / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(str(limit_bytes))
        except OSError:
            box.remove()
            return None
        return box

    def enter(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: runs in the child before exec)."""
        (self.folder / ("tasks" if self.version == 1 else "cgroup.procs")).write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        """The most memory (page cache included) the cgroup's processes held at once."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.folder / name).read_text())

    def oom_kills(self) -> int:
        if self.version == 1:
            fields = dict(line.split() for line in (self.folder / "memory.oom_control").read_text().splitlines())
        else:
            fields = dict(line.split() for line in (self.folder / "memory.events").read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def pressure(self) -> dict:
        """How hard the limit pressed: major page faults of the cgroup's processes (pages read back from disk:
        after the page cache was emptied, the code each process first runs, and later what the kernel reclaimed
        to stay under the limit and was needed again) and how often a charge met the limit (the kernel
        reclaimed, or would have failed it)."""
        stat = dict(line.split() for line in (self.folder / "memory.stat").read_text().splitlines())
        faults = int(stat.get("total_pgmajfault" if self.version == 1 else "pgmajfault", 0))
        if self.version == 1:
            hits = int((self.folder / "memory.failcnt").read_text())
        else:
            events = dict(line.split() for line in (self.folder / "memory.events").read_text().splitlines())
            hits = int(events.get("max", 0))
        return {"major_faults": faults, "limit_hits": hits}

    def pids(self) -> list[int]:
        """The processes in the cgroup now."""
        try:
            text = (self.folder / "cgroup.procs").read_text()  # v1's "tasks" lists threads
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (an engine's children outlive a killed parent)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        for _ in range(50):  # the last process may still be leaving
            try:
                if self.folder.exists():
                    self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)


#: how often :func:`run_limited` samples the resident memory of each process in the cgroup
SAMPLE_S = 0.5

#: /proc/PID/status fields sampled per process (kB): resident in all, anonymous, file-backed, shared memory
_STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class LimitedRun:
    """How a command run by :func:`run_limited` ended, and the memory its processes held."""

    limit_bytes: int | None
    exit_code: int | None  # None: killed at the timeout
    oom_kills: int
    peak_bytes: int  # the cgroup's peak: every process of it, page cache included
    wall_s: float
    #: per process (``pid``, ``name`` from its title or command line), the highest sample of each _STATUS_KEYS (bytes)
    processes: list[dict] = field(default_factory=list)
    #: :meth:`MemoryCgroup.pressure` at the end (start-up included)
    pressure: dict = field(default_factory=dict)

    @property
    def ended(self) -> str:
        """``ran``, ``OOM-killed (...)``, ``timed out`` or ``exit code N``, for a report."""
        if self.exit_code is None:
            return "timed out" + (f", {self.oom_kills} OOM kill(s)" if self.oom_kills else "")
        if self.oom_kills:
            return f"OOM-killed ({self.oom_kills} kill(s), exit code {self.exit_code})"
        return "ran" if self.exit_code == 0 else f"exit code {self.exit_code}"

    def as_dict(self) -> dict:
        return {"memory_limit_bytes": self.limit_bytes, "ended": self.ended, "exit_code": self.exit_code,
                "oom_kills": self.oom_kills, "peak_memory_bytes": self.peak_bytes, "process_wall_s": self.wall_s,
                "processes": self.processes, **self.pressure}


def _process_sample(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Name" or key in _STATUS_KEYS:
            fields[key] = value.strip()
    # vLLM names its processes by setproctitle (``VLLM::EngineCore``); the command line says the rest
    name = cmdline if cmdline.startswith("VLLM::") else f"{fields.get('Name', '?')}: {cmdline[:120]}"
    return {"pid": pid, "name": name, **{k: int(fields[k].split()[0]) * 1024 for k in _STATUS_KEYS if k in fields}}


def _sample_processes(box: MemoryCgroup, stop: threading.Event, peaks: dict[int, dict]) -> None:
    while not stop.wait(SAMPLE_S):
        for pid in box.pids():
            sample = _process_sample(pid)
            if sample is None:
                continue
            peak = peaks.setdefault(pid, sample)
            peak["name"] = sample["name"]  # a process renames itself after it starts
            for key in _STATUS_KEYS:
                peak[key] = max(peak.get(key, 0), sample.get(key, 0))


def run_limited(cmd: list[str], limit_bytes: int | None, *, timeout_s: float, **popen) -> LimitedRun:
    """Run ``cmd`` in a fresh memory cgroup of ``limit_bytes`` (None: no limit, only measured).

    ``popen``: passed to :class:`subprocess.Popen` (``env``, ``cwd``, ``stdout``...).
    At the timeout every process of the cgroup is killed. Raises RuntimeError
    with :attr:`MemoryCgroup.CANNOT` where no cgroup can be made.
    """
    box = MemoryCgroup.make(limit_bytes if limit_bytes else 2**50)  # v1 and v2 take any large number
    if box is None:
        raise RuntimeError(MemoryCgroup.CANNOT)
    peaks: dict[int, dict] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_processes, args=(box, stop, peaks), daemon=True)
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, preexec_fn=box.enter, **popen)
        sampler.start()
        try:
            exit_code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            exit_code = None
        box.kill_all()  # the engine's children, if its front end died first
        proc.wait()
        stop.set()
        sampler.join()
        return LimitedRun(limit_bytes, exit_code, box.oom_kills(), box.peak_bytes(),
                          round(time.perf_counter() - started, 1), sorted(peaks.values(), key=lambda p: p["pid"]),
                          box.pressure())
    finally:
        stop.set()
        box.kill_all()
        box.remove()


def evict_page_cache(paths: list[Path]) -> str:
    """Empty the page cache before an engine runs under a limit; how (for the report).

    As root, all of it (``drop_caches``); else the pages of ``paths`` (files, or
    folders whose files are evicted) with ``POSIX_FADV_DONTNEED``, which any user may do.
    Pages left cached would be charged to whoever read them first, not to the engine's cgroup.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped (drop_caches)"
    except OSError:
        pass
    for path in paths:
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "model files evicted (fadvise DONTNEED; not root, so other files stay cached)"
