"""Ask Linux for AMX tile state, once per process, where the CPU has AMX.

Since Linux 5.16 a process must ask for the AMX tile data state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``) before its first tile
instruction, or the kernel kills it with SIGILL. vLLM 0.32's CPU kernels (the
AMX attention and MoE paths) execute tile instructions without asking; oneDNN
asks for itself when it first uses AMX. So an in-process engine usually
survives (something in the parent asked first), while vLLM's default
multiprocess workers die on their first forward pass (``exit code: -4``).

:func:`request_amx_permission` runs from the plugin's entry point, which vLLM
calls in every process it starts (API server, engine core, each worker) before
any model code. It needs neither torch nor vLLM: one system call through libc.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import sys
from dataclasses import dataclass

logger = logging.getLogger("vllm.moe_offload")

#: x86-64 system call number of arch_prctl (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_ARCH_PRCTL = 158
#: arch_prctl codes and the tile data feature bit (arch/x86/include/uapi/asm/prctl.h, asm/fpu/types.h)
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18

#: ``VLLM_PLUGINS`` for stock vLLM that survives its AMX kernels: only this permission, none of the
#: plugin's patches or layers (the ``moe_offload_amx`` entry point in pyproject.toml). Stock runs of the
#: tests and benchmarks use it; ``VLLM_PLUGINS=none`` would leave their workers to SIGILL on AMX CPUs.
STOCK_VLLM_PLUGINS = "moe_offload_amx"


@dataclass(frozen=True)
class AmxPermission:
    """What :func:`request_amx_permission` found: ``granted`` and, in words, why or why not."""

    granted: bool
    reason: str


#: the answer of this process (keyed by pid: a forked child asks again, which costs one system call)
_answers: dict[int, AmxPermission] = {}


def cpu_reports_amx(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags list ``amx_tile`` (any core's; they are all alike)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        return False
    return False


def _arch_prctl(libc, code: int, arg) -> int:
    ctypes.set_errno(0)
    return libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_int(code), arg)


def _tile_data_permitted(libc) -> bool:
    features = ctypes.c_uint64(0)
    if _arch_prctl(libc, ARCH_GET_XCOMP_PERM, ctypes.byref(features)) != 0:
        return False
    return bool(features.value & (1 << XFEATURE_XTILEDATA))


def request_amx_permission() -> AmxPermission:
    """Ask once per process for AMX tile data on x86-64 Linux when the CPU has AMX; elsewhere do nothing.

    Never raises: a refusal is logged at warning level with the reason (the
    process goes on, and vLLM may then die on its first AMX kernel as it would
    without the plugin). Safe to call again: later calls return the first answer.
    """
    pid = os.getpid()
    if pid not in _answers:
        _answers[pid] = result = _ask()
        if result.granted:
            logger.debug("AMX tile data: %s (pid %d)", result.reason, pid)
        elif result.reason.startswith("refused"):
            logger.warning(
                "AMX tile data was %s; vLLM's AMX kernels may stop this process with SIGILL (exit code -4)",
                result.reason,
            )
    return _answers[pid]


def _ask() -> AmxPermission:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return AmxPermission(False, f"not needed on {sys.platform}/{platform.machine()}")
    if not cpu_reports_amx():
        return AmxPermission(False, "not needed: the CPU reports no amx_tile")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if _tile_data_permitted(libc):
            return AmxPermission(True, "already permitted in this process")
        if _arch_prctl(libc, ARCH_REQ_XCOMP_PERM, ctypes.c_ulong(XFEATURE_XTILEDATA)) != 0:
            code = ctypes.get_errno()
            return AmxPermission(
                False, f"refused by arch_prctl(ARCH_REQ_XCOMP_PERM): {errno.errorcode.get(code, code)} "
                f"({os.strerror(code)}; Linux 5.16 or newer is needed, and a seccomp filter may block it)",
            )
    except (OSError, AttributeError) as exc:
        return AmxPermission(False, f"refused: arch_prctl could not be called ({exc})")
    return AmxPermission(True, "granted by arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)")
