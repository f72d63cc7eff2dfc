"""The AMX permission (runtime/amx.py): asked once per process, and only where the CPU has AMX.

Each check runs in a fresh interpreter: the permission is per process, and
pytest's own process may already hold it (oneDNN asks when it first uses AMX).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO
from vllm_moe_offload.runtime.amx import cpu_reports_amx

#: prints whether tile data is permitted before and after ``{call}`` and the two requests, and their answers
_PROBE = textwrap.dedent("""
    import ctypes, json, logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    libc = ctypes.CDLL(None, use_errno=True)

    def permitted():
        features = ctypes.c_uint64(0)
        libc.syscall(158, 0x1022, ctypes.byref(features))  # arch_prctl(ARCH_GET_XCOMP_PERM)
        return bool(features.value & (1 << 18))

    before = permitted()
    {call}
    after_call = permitted()
    from vllm_moe_offload.runtime.amx import request_amx_permission
    first, second = request_amx_permission(), request_amx_permission()
    print(json.dumps({{"before": before, "after_call": after_call, "after": permitted(), "first": [first.granted, first.reason],
                      "same": first is second}}))
""")


def _probe(call: str = "") -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(call=call)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_fresh_process_gets_tile_data_once():
    got, log = _probe()
    assert got["same"]  # the second call answers from the first
    if not cpu_reports_amx():
        print("this CPU reports no AMX: the permission is not asked for")
        assert got["first"] == [False, "not needed: the CPU reports no amx_tile"] and not got["after"]
        return
    assert not got["before"]
    assert got["first"][0] and got["after"]
    assert log.count("AMX tile data: granted") == 1  # logged once, at debug level


def test_the_plugin_entry_point_asks_before_anything_else():
    """vLLM calls ``register()`` first thing in each process it starts; the permission is held after it."""
    got, _ = _probe("import vllm_moe_offload; vllm_moe_offload.register()")
    assert got["after_call"] == got["first"][0] == cpu_reports_amx()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    with_amx, without = tmp_path / "with", tmp_path / "without"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16x\n")
    assert cpu_reports_amx(str(with_amx))
    assert not cpu_reports_amx(str(without))
    assert not cpu_reports_amx(str(tmp_path / "missing"))
