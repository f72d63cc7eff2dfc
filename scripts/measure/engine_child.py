"""What the per-engine measurement scripts share: one engine per fresh process, its loads timed, and a bench
entry's short name.

Used by ``decode_breakdown.py``, ``first_reads.py`` and ``link_idle.py``; each defines ``_child(spec) -> dict``,
which runs in the fresh process (vLLM's one-process engine there, so its layers are timed where they run).
``prompt_step.py`` and ``kernel_beside_reads.py`` take their engine's arguments from here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def run_child(module: str, spec: dict) -> dict:
    """``module._child(spec)`` (a script of this folder) in a fresh process; its result through a file (vLLM
    logs to stdout). Exits with the child's error output where it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code = (f"import json, sys; sys.path.insert(0, sys.argv[3]); import {module} as m; "
                "json.dump(m._child(json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(out), str(Path(__file__).parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{module}: the {spec['name']} engine failed (exit {done.returncode}):\n"
                             + done.stderr[-3000:])
        return json.loads(out.read_text())


def add_engine_arguments(parser) -> None:
    """The engine a one-process script measures: a MoE checkpoint, a bench entry and its budget."""
    parser.add_argument("model", help="a MoE checkpoint folder (e.g. a pad-model copy)")
    parser.add_argument("--policy", default="lru[store=kernel]",
                        help="a bench entry, NAME or NAME[key=value;...] (default: lru[store=kernel])")
    parser.add_argument("--budget", default="auto", help="the plugin's budget (default auto)")


def offload_settings(parser, args) -> dict:
    """``--policy`` at ``--budget`` as the plugin's settings (``cli.bench.policy_settings``, with its messages);
    a bad entry exits through ``parser.error``."""
    from vllm_moe_offload.cli.bench import policy_settings

    try:
        return {**policy_settings(args.policy), "budget": args.budget}
    except ValueError as err:
        parser.error(str(err))


def check_args(args, script: str, positive: tuple[str, ...]) -> None:
    """Exit with a clear message where ``args.tokens`` is missing or one of ``positive`` is under 1."""
    if not args.tokens.exists():
        raise SystemExit(f"{script}: no token file at {args.tokens} (give --tokens)")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"{script}: --{name.replace('_', '-')} must be at least 1")


def time_loads(record: Callable[[float, float], None]) -> None:
    """Make every expert load of this process's engines call ``record(started, ended)`` on its I/O thread
    (``time.perf_counter`` seconds). For a child's engine in one process (the worker's loads run there)."""
    from vllm_moe_offload.runtime import transfer

    engine_submit = transfer.ThreadTransferEngine.submit

    def submit(self, fn, *args, priority=transfer.DEMAND):
        def timed_load(*a):
            started = time.perf_counter()
            try:
                return fn(*a)
            finally:
                record(started, time.perf_counter())
        return engine_submit(self, timed_load, *args, priority=priority)

    transfer.ThreadTransferEngine.submit = submit


def short(entry: str) -> str:
    """A bench entry as the tables name it: without its ``cache_dir`` (a path, the same for every run)."""
    return re.sub(r";?cache_dir=[^;\]]*", "", entry).replace("[;", "[").replace("[]", "")
