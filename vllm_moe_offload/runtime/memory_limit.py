"""How much memory this process's engine may still allocate: its cgroup's limit, else the system's.

The page cache counts against a cgroup's limit; the part no process maps (and
that is not shared memory) can be reclaimed, so it is not counted as used. The
kernel's "working set" leaves out only inactive file pages, but the active ones
unmapped are reclaimed too, only later: counting them made the room ``auto``
saw vary by 0.27 GiB between two identical engine starts (1.44 and 1.71 GiB in
use under a 3.25 GiB limit) while the worker held 767 MiB both times. A
cgroup nested in others is bound by the smallest limit on its path.
Where no cgroup limits memory, the system's ``MemAvailable`` answers. Both
cgroup versions are read: v1's memory controller (``memory.limit_in_bytes``,
``memory.stat``'s ``hierarchical_memory_limit``) and v2's unified tree
(``memory.max``, ``memory.current``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_moe_offload.core.config import format_bytes
from vllm_moe_offload.core.memory_budget import MemoryView

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: v1 reports "no limit" as the largest page-aligned 63-bit value; anything this large is no limit
_UNLIMITED_BYTES = 2**60


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup's memory limit and use (``used_bytes`` without reclaimable page cache)."""

    version: int
    path: Path
    limit_bytes: int
    used_bytes: int


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def own_memory_cgroup(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> tuple[Path, int] | None:
    """(folder, version) of this process's memory cgroup: v1's memory controller, else the v2 tree."""
    own = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    except OSError:
        return None
    if "memory" in own:
        return root / "memory" / own["memory"].lstrip("/"), 1
    if "" in own:
        return root / own[""].lstrip("/"), 2
    return None


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupMemory | None:
    """This process's cgroup memory limit and use, or None where no cgroup limits memory."""
    own = own_memory_cgroup(root, proc_cgroup)
    if own is None:
        return None
    folder, version = own
    if version == 1:
        stat = _stat(folder / "memory.stat")
        limit = min(x for x in (_read_int(folder / "memory.limit_in_bytes"), stat.get("hierarchical_memory_limit"),
                                _UNLIMITED_BYTES) if x is not None)
        usage = _read_int(folder / "memory.usage_in_bytes")
        if limit >= _UNLIMITED_BYTES or usage is None:
            return None
        reclaimable = _reclaimable(stat, "total_inactive_file", "total_cache", "total_mapped_file", "total_shmem")
        return CgroupMemory(1, folder, limit, max(0, usage - reclaimable))
    # v2: the smallest memory.max from this cgroup up to the root
    limit, walk = _UNLIMITED_BYTES, folder
    while walk != root.parent and walk.is_relative_to(root):
        value = _read_int(walk / "memory.max")
        if value is not None:
            limit = min(limit, value)
        walk = walk.parent
    usage = _read_int(folder / "memory.current")
    if limit >= _UNLIMITED_BYTES or usage is None:
        return None
    stat = _stat(folder / "memory.stat")
    return CgroupMemory(2, folder, limit, max(0, usage - _reclaimable(stat, "inactive_file", "file", "file_mapped",
                                                                     "shmem")))


def _reclaimable(stat: dict[str, int], inactive: str, cache: str, mapped: str, shmem: str) -> int:
    """Page cache the kernel can take back: what no process maps and is not shared memory (at least the
    inactive file pages); only the inactive ones where ``memory.stat`` lacks the other figures."""
    if cache not in stat or mapped not in stat:
        return stat.get(inactive, 0)
    return max(stat.get(inactive, 0), stat[cache] - stat[mapped] - stat.get(shmem, 0))


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemAvailable line")


def engine_memory() -> MemoryView:
    """What the engine may still allocate: the cgroup's room where it is the tighter bound, else MemAvailable."""
    system = mem_available_bytes()
    cgroup = cgroup_memory()
    if cgroup is not None and cgroup.limit_bytes - cgroup.used_bytes < system:
        return MemoryView(
            cgroup.limit_bytes - cgroup.used_bytes,
            f"cgroup v{cgroup.version} limit {format_bytes(cgroup.limit_bytes)} less "
            f"{format_bytes(cgroup.used_bytes)} in use, reclaimable page cache not counted",
            cgroup.used_bytes,
        )
    return MemoryView(system, "MemAvailable of the system" + ("" if cgroup is None else ", below the cgroup's room"))
