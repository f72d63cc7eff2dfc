"""The ``--moe-offload*`` flags of ``vllm serve``: folded into the config, listed in help, refused clearly."""

from __future__ import annotations

import subprocess

from tests.server_utils import VLLM


def test_flags_fold_into_additional_config():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([
        "some/model", "--moe-offload", "lru", "--moe-offload-budget", "512MiB", "--moe-offload-tier", "disk",
        "--no-moe-offload-direct-io", "--moe-offload-replacement", "decay", "--moe-offload-token-prefetch",
        "--additional-config", '{"other": 1}',
    ])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {
        "other": 1,
        "moe_offload": {
            "policy": "lru", "budget": "512MiB", "tier": "disk", "direct_io": False, "replacement": "decay",
            "token_prefetch": True,
        },
    }
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["some/model"]))
    assert "moe_offload" not in plain.additional_config


def _vllm(*args, env=None, timeout=120):
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_help_lists_the_flags():
    out = _vllm("serve", "--help=MoEOffload")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--moe-offload ", "--moe-offload-budget", "--moe-offload-tier", "--moe-offload-direct-io"):
        assert flag in out.stdout
    assert "{off,ondemand,lru,fate,klotski,eap}" in out.stdout
    assert "--moe-offload-klotski-features" in out.stdout and "--moe-offload-klotski-max-group" in out.stdout
    assert "{lru,arc,lfru,log2decay,ewma,decay,nextuse}" in out.stdout  # --moe-offload-replacement
    assert "--moe-offload-token-prefetch, --no-moe-offload-token-prefetch" in out.stdout


def test_bad_budget_flag_exits_with_the_reason(tiny_models):
    out = _vllm("serve", str(tiny_models["mixtral"]), "--moe-offload", "lru", "--moe-offload-budget", "12parsecs")
    assert out.returncode == 2
    assert "budget '12parsecs' is malformed; allowed: auto, a size such as 4GiB" in out.stderr


def test_vllm_version_works_with_the_cpu_wheel():
    out = _vllm("--version")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.32")


# `vllm serve --moe-offload lru --moe-offload-budget 50%` answering an OpenAI client with stock's tokens:
# tests/integration/test_server.py
