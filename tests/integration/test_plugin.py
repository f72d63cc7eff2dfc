"""The entry point: idempotent, and clear about vLLM versions it does not support."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_register_twice_patches_once():
    out = _run("""
        import vllm_moe_offload
        from vllm.plugins import load_general_plugins
        load_general_plugins()          # vLLM's own call: registers the plugin
        vllm_moe_offload._registered = False
        vllm_moe_offload.register()     # as if a second plugin load happened
        from vllm.engine.arg_utils import EngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.model_executor.custom_op import op_registry_oot
        parser = make_arg_parser(FlexibleArgumentParser())   # would fail on a duplicate --moe-offload
        wrapped = EngineArgs.create_engine_config
        assert not hasattr(wrapped.__wrapped__, "__wrapped__"), "wrapped twice"
        assert op_registry_oot["RoutedExperts"].__name__ == "OffloadRoutedExperts"
        print("ok")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_unsupported_vllm_version_is_named_and_changes_nothing():
    out = _run("""
        import logging, vllm
        logging.basicConfig()
        vllm.__version__ = "0.99.0"
        import vllm_moe_offload
        vllm_moe_offload.register()
        from vllm.model_executor.custom_op import op_registry_oot
        from vllm.engine.arg_utils import EngineArgs
        assert "RoutedExperts" not in op_registry_oot
        assert not hasattr(EngineArgs.create_engine_config, "__wrapped__")
        print("ok")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "supports vLLM 0.32.x, but this is vLLM 0.99.0: the plugin stays inactive" in out.stderr
