"""``vllm-moe-offload trace``: record a model's real routing inside vLLM, as a trace file.

Runs the model in vLLM (offload on or off, with the same ``--moe-offload*``
flags as ``vllm serve``) over prompts and writes, per engine step and MoE
layer, each token's routed expert ids and weights (optionally the router's
input) in the ``.npz`` format of ``core/traces.py``; ``simulate`` replays it.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set
before vLLM is imported) and eagerly (``enforce_eager``): the recorder
(``integration/tracing.py``) lives in the worker and reads Python-side values.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vllm_moe_offload.cli.main import Subcommand
from vllm_moe_offload.integration.flags import add_flags, fold_into_additional_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (or a Hugging Face id already in the local cache)")
    parser.add_argument(
        "--prompts", type=Path, required=True,
        help="prompts: a text file (one prompt per line) or a .npy of token ids cut into --prompt-len slices",
    )
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all "
                        "lines of a text file; 8 slices of a .npy)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt cut from a .npy "
                        "(default %(default)s)")
    parser.add_argument("--hidden", action="store_true", help="also record each MoE layer's router input")
    parser.add_argument("--save-profile", type=Path, default=None, metavar="PATH",
                        help="also write the activation profile of the trace (for --moe-offload-profile)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences per engine step (1: batch-1 steps; default vLLM's)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: longest prompt + --max-tokens")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20,
                        help="KV cache size in bytes (default 256 MiB)")
    add_flags(parser)


def run(args: argparse.Namespace) -> int:
    try:
        prompts, labels = load_prompts(args.prompts, args.num_prompts, args.prompt_len)
    except (ValueError, OSError) as exc:
        print(f"vllm-moe-offload trace: error: {exc}")
        return 2
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the recorder must share this process
    trace = record_trace(args, prompts, labels)
    path = trace.write(args.out)
    t = trace.to_trace()
    print(
        f"wrote {path}: {t.num_tokens} token rows, {len(t.sequences())} sequences, "
        f"{trace.num_steps} steps, {t.num_trace_layers} MoE layers x top-{t.meta.top_k} of "
        f"{t.meta.num_experts} experts" + (", with router inputs" if t.hidden is not None else "")
    )
    if args.save_profile is not None:
        from vllm_moe_offload.core.correlation import build_profile_from_trace

        saved = build_profile_from_trace(t).save(args.save_profile, source=str(path))
        print(f"wrote {saved}: the activation profile of this trace (serve with --moe-offload-profile {saved})")
    return 0


def load_prompts(path: Path, num_prompts: int | None, prompt_len: int) -> tuple[list, list[str]]:
    """Prompts for ``LLM.generate`` and a short label for each."""
    if path.suffix == ".npy":
        import numpy as np

        tokens = np.load(path).astype(np.int64).ravel()
        count = num_prompts or 8
        if prompt_len < 1 or count * prompt_len > len(tokens):
            raise ValueError(f"{path} holds {len(tokens)} tokens, fewer than {count} prompts x {prompt_len}")
        prompts = [{"prompt_token_ids": tokens[i * prompt_len:(i + 1) * prompt_len].tolist()} for i in range(count)]
        labels = [f"{path.name}[{i * prompt_len}:{(i + 1) * prompt_len}]" for i in range(count)]
        return prompts, labels
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    lines = lines[:num_prompts] if num_prompts else lines
    if not lines:
        raise ValueError(f"{path} has no prompts")
    return lines, [line[:60] for line in lines]


def record_trace(args: argparse.Namespace, prompts: list, labels: list[str]):
    """Run the engine with a recorder attached; a filled ``TraceWriter``."""
    from vllm import LLM, SamplingParams

    from vllm_moe_offload.integration import tracing

    additional = fold_into_additional_config(args, None)
    max_len = args.max_model_len or _longest(args.model, prompts) + args.max_tokens
    engine = {"max_model_len": max_len, "kv_cache_memory_bytes": args.kv_cache_bytes}
    if args.max_num_seqs:
        engine["max_num_seqs"] = args.max_num_seqs
    llm = LLM(args.model, dtype="bfloat16", enforce_eager=True, seed=0, additional_config=additional, **engine)
    geometry = llm.collective_rpc(tracing.install, kwargs={"hidden": args.hidden})[0]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    outputs = llm.generate(prompts, params)
    steps = llm.collective_rpc(tracing.drain)[0]
    llm.collective_rpc(tracing.uninstall)
    notes = {"engine": engine, "moe_offload": additional.get("moe_offload"), "max_tokens": args.max_tokens,
             "ignore_eos": args.ignore_eos, "greedy": True}
    return build_writer(args.model, geometry, steps, [o.request_id for o in outputs], labels, json.dumps(notes))


def _longest(model: str, prompts: list) -> int:
    """Tokens of the longest prompt (text prompts through the model's own tokenizer)."""
    if all(isinstance(p, dict) for p in prompts):
        return max(len(p["prompt_token_ids"]) for p in prompts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return max(len(tokenizer(p)["input_ids"]) for p in prompts)


def build_writer(model: str, geometry: dict, steps: list, request_ids: list[str], labels: list[str], notes: str):
    """Turn the worker's step records into a ``TraceWriter`` (sequences numbered as the prompts)."""
    from vllm_moe_offload.core.traces import TraceMeta, TraceWriter

    meta = TraceMeta(
        model=model, num_layers=len(geometry["layer_ids"]), num_experts=geometry["num_experts"],
        top_k=geometry["top_k"], layer_ids=tuple(geometry["layer_ids"]), expert_bytes=geometry["expert_bytes"],
        seq_names=tuple(labels), source="vllm-moe-offload trace (vLLM, greedy)", notes=notes,
    )
    writer = TraceWriter(meta)
    seq_of = {rid: i for i, rid in enumerate(request_ids)}
    for step in steps:
        seq_numbers = [seq_of[_external_id(rid, seq_of)] for rid in step.req_ids]
        writer.add_step(
            seq_ids=[seq_numbers[r] for r in step.row_req.tolist()],
            positions=step.positions, topk_ids=step.topk_ids, topk_weights=step.topk_weights,
            token_ids=step.token_ids, hidden=step.hidden,
        )
    return writer


def _external_id(internal: str, known: dict[str, int]) -> str:
    """The id ``LLM.generate`` reported for a worker-side request id.

    vLLM 0.32 suffixes the user-visible id with ``-<random hex>`` inside the engine.
    """
    if internal in known:
        return internal
    head = internal.rsplit("-", 1)[0]
    if head in known:
        return head
    raise KeyError(f"request {internal!r} of the worker matches no request of this run ({sorted(known)[:4]}...)")


COMMAND = Subcommand(
    name="trace",
    help="record the routing of a model running in vLLM (in-process, eager) as a .npz trace",
    add_arguments=add_arguments,
    run=run,
)


if __name__ == "__main__":
    import sys

    from vllm_moe_offload.cli.main import main

    sys.exit(main(["trace", *sys.argv[1:]]))
