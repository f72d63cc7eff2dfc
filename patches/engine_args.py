"""Patch of ``vllm.engine.arg_utils.EngineArgs``: the ``--moe-offload*`` flags.

What: wraps ``EngineArgs.add_cli_args`` (adds the MoEOffload argument group),
``EngineArgs.from_cli_args`` (folds the flags into
``additional_config["moe_offload"]``) and ``EngineArgs.create_engine_config``
(validates that section once, in the process the user started, and selects the
plugin's worker class when offload is on).
Why: vLLM has no extension point for plugin CLI flags, and ``additional_config``
is validated by nobody until the worker builds the model, where errors are hard
to read.
Upstream: a plugin hook for CLI arguments / validated ``additional_config``
sections would replace all three wrappers.
Remove when: vLLM offers such a hook; until then re-check on every vLLM bump
(the contract checks below fail loudly when the signatures change).
"""

from __future__ import annotations

from vllm_moe_offload.patches import expect_params, is_patched, mark


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if is_patched(EngineArgs, "create_engine_config"):
        return
    orig_add = expect_params(EngineArgs, "add_cli_args", ["parser"]).__func__
    orig_from = expect_params(EngineArgs, "from_cli_args", ["cls", "args"]).__func__
    orig_create = expect_params(EngineArgs, "create_engine_config", ["self", "usage_context", "headless"])
    for field in ("additional_config", "worker_cls"):
        if field not in EngineArgs.__dataclass_fields__:
            raise RuntimeError(f"vllm-moe-offload: EngineArgs.{field} is missing; this vLLM is not supported")

    def add_cli_args(parser):
        from vllm_moe_offload.integration.flags import add_flags

        parser = orig_add(parser)
        add_flags(parser)
        return parser

    def from_cli_args(cls, args):
        from vllm_moe_offload.integration.flags import fold_into_additional_config

        engine_args = orig_from(cls, args)
        engine_args.additional_config = fold_into_additional_config(args, engine_args.additional_config)
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        from vllm_moe_offload.integration.engine_config import after_config, before_config
        from vllm_moe_offload.patches.cpu_executor import keep_uni_executor

        offload = before_config(self)
        requested_backend = self.distributed_executor_backend
        vllm_config = orig_create(self, *args, **kwargs)
        if offload is not None:
            after_config(vllm_config, offload)
            keep_uni_executor(vllm_config.parallel_config, requested_backend)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(mark(add_cli_args, orig_add))
    EngineArgs.from_cli_args = classmethod(mark(from_cli_args, orig_from))
    EngineArgs.create_engine_config = mark(create_engine_config, orig_create)
