"""Bad offload settings fail in the user's process, before any engine starts, and say what is allowed."""

from __future__ import annotations

import pytest

from vllm_moe_offload.core.config import OffloadConfigError


@pytest.fixture(scope="module")
def make_llm(tiny_models, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_RPC_BASE_PATH", str(tmp_path_factory.mktemp("rpc")))
    from vllm import LLM

    def make(section):
        return LLM(
            model=str(tiny_models["mixtral"]), dtype="bfloat16", max_model_len=256, enforce_eager=True,
            kv_cache_memory_bytes=32 * 2**20, additional_config={"moe_offload": section},
        )

    return make


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize(
    "section, message",
    [
        ({"policy": "lru", "budgett": "1GiB"}, r"unknown moe_offload key\(s\) \['budgett'\]; allowed keys"),
        ({"policy": "lru", "budget": "12 parsecs"}, r"budget '12 parsecs' is malformed; allowed: auto, a size"),
        ({"policy": "lru", "budget": 0}, r"budget 0 must be positive"),
        ({"policy": "lru", "budget": "0%"}, r"must be in \(0%, 100%\]"),
        ({"policy": "lru", "budget": "-1GiB"}, r"budget '-1GiB' is malformed"),
        ({"policy": "belady"}, r"policy 'belady' is not one of \['off', 'ondemand', 'lru', 'fate', 'klotski', 'eap'\]"),
        ({"policy": "lru", "profile": "/no/such/profile.npz"}, r"profile '/no/such/profile.npz' is not a file"),
        ({"policy": "lru", "io_threads": 0}, r"io_threads 0 is out of range; allowed: 1 to 64"),
        # slots: 2 MoE layers x top-2 x (3 x 128 x 256 x 2 bytes) = 786432 bytes, plus the staging of one
        # I/O thread: read buffer 200704 + conversion 589824 = 790528 bytes
        (
            {"policy": "lru", "budget": "1KiB"},
            r"budget 1.00 KiB \(1024 bytes\) is below the minimum one step needs: 1576960 bytes .*"
            r"slots 786432 .* \+ staging 790528 .* allowed: 1576960 to 3936256 bytes",
        ),
        ({"policy": "lru", "budget": "20%"}, r"below the minimum one step needs: 1576960 bytes"),
    ],
)
def test_bad_setting_is_refused_with_what_is_allowed(make_llm, section, message):
    with pytest.raises(OffloadConfigError, match=message):
        make_llm(section)


def test_worker_cls_conflict_is_refused(tiny_models):
    from vllm import LLM

    with pytest.raises(ValueError, match="cannot be combined with --moe-offload"):
        LLM(
            model=str(tiny_models["mixtral"]), worker_cls="vllm.v1.worker.cpu_worker.CPUWorker",
            additional_config={"moe_offload": {"policy": "lru"}},
        )


@pytest.mark.parametrize(
    "parallel, message",
    [
        ({"pipeline_parallel_size": 2}, r"does not support pipeline parallelism yet \(pipeline_parallel_size=2\)"),
        ({"enable_expert_parallel": True}, r"cannot be combined with expert parallelism .* use tensor parallelism"),
    ],
)
def test_parallelism_other_than_tensor_parallel_is_refused(tiny_models, parallel, message):
    from vllm import LLM

    with pytest.raises(NotImplementedError, match=message):
        LLM(model=str(tiny_models["mixtral"]), additional_config={"moe_offload": {"policy": "lru"}}, **parallel)


def test_data_parallel_is_refused(tiny_models):
    # LLM(...) refuses data_parallel_size > 1 itself; the engine args of `vllm serve` reach our check
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    args = EngineArgs(
        model=str(tiny_models["mixtral"]), data_parallel_size=2, additional_config={"moe_offload": {"policy": "lru"}},
    )
    with pytest.raises(NotImplementedError, match=r"does not support data parallelism yet \(data_parallel_size=2\)"):
        args.create_engine_config()


def test_tensor_parallel_budget_error_names_the_per_rank_split(tiny_models):
    """TP=2 is accepted; the budget check (in the user's process) is made for one rank's half."""
    from vllm import LLM

    # per rank: 2 layers x top-2 x 98304-byte shards = 393216 bytes, plus the staging 593920 bytes (a read
    # buffer of 200704 for the whole unsharded expert, conversion 196608 + 2 x 98304): 987136 bytes;
    # 2 MiB / 2 is enough, 512 KiB / 2 = 256 KiB is not
    with pytest.raises(
        OffloadConfigError,
        match=r"budget 256.00 KiB \(262144 bytes\) is below the minimum one step needs: 987136 bytes .*"
        r"\[per rank: with tensor_parallel_size=2 each rank offloads its 1/2 shard of every expert with 1/2 "
        r"of the budget 512.00 KiB\]",
    ):
        LLM(
            model=str(tiny_models["mixtral"]), tensor_parallel_size=2,
            additional_config={"moe_offload": {"policy": "lru", "budget": "512KiB"}},
        )
