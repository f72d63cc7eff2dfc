"""The ``--moe-offload*`` flags of ``vllm serve``, and the server answering an OpenAI client."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PROMPTS, engine_env, run_engines
from tests.server_utils import VLLM, free_port, stop, wait_healthy


def test_flags_fold_into_additional_config():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([
        "some/model", "--moe-offload", "lru", "--moe-offload-budget", "512MiB", "--moe-offload-tier", "disk",
        "--no-moe-offload-direct-io", "--additional-config", '{"other": 1}',
    ])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {
        "other": 1,
        "moe_offload": {"policy": "lru", "budget": "512MiB", "tier": "disk", "direct_io": False},
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


def test_bad_budget_flag_exits_with_the_reason(tiny_models):
    out = _vllm("serve", str(tiny_models["mixtral"]), "--moe-offload", "lru", "--moe-offload-budget", "12parsecs")
    assert out.returncode == 2
    assert "budget '12parsecs' is malformed; allowed: a size such as 4GiB" in out.stderr


def test_vllm_version_works_with_the_cpu_wheel():
    out = _vllm("--version")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.32")


@pytest.mark.slow
@pytest.mark.engine
def test_serve_with_offload_answers_openai_client_like_stock(tiny_models, tmp_path):
    """`vllm serve MODEL --moe-offload lru --moe-offload-budget 50%` on 127.0.0.1, tokens equal to stock."""
    import openai

    model = tiny_models["mixtral"]
    stock = run_engines(
        tmp_path / "stock",
        [{"name": "stock", "model": str(model), "prompts": PROMPTS[:2], "max_tokens": 16}],
        stock=True,
    )["stock"]["tokens"]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [VLLM, "serve", str(model), "--moe-offload", "lru", "--moe-offload-budget", "50%",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
         "--kv-cache-memory-bytes", str(64 * 2**20), "--enforce-eager", "--served-model-name", "tiny"],
        env=engine_env(tmp_path, stock=False, multiprocess=True), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(port, server, tmp_path / "serve.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for prompt, expected in zip(PROMPTS[:2], stock):
            done = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=16, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            assert done.choices[0].token_ids == expected
            assert done.usage.completion_tokens == 16
    finally:
        stop(server)
        log.close()
    served = (tmp_path / "serve.log").read_text()
    assert "MoE offload ready" in served and "policy lru" in served
    assert "MoE offload at shutdown" in served

