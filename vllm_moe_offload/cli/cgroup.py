"""A fresh memory cgroup with a limit, to run an engine under it (v1 or v2, whichever the machine has).

For ``vllm-moe-offload bench --memory-limit`` and the tests: the page cache
counts against the limit as it does on a real box, and the cgroup reports the
peak memory of all its processes and whether the kernel killed one for memory.
It is made under this process's own memory cgroup, which needs root (or a
delegated cgroup tree).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
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

    def remove(self) -> None:
        for _ in range(50):  # the last process may still be leaving
            try:
                if self.folder.exists():
                    self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)
