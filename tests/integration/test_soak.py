"""Soak: 64 concurrent streaming requests against ``vllm serve --moe-offload fate`` at a 25% budget.

Every request must finish (or fail with a reason) within a bound, none may
hang, greedy outputs must equal stock vLLM's, and the expert slots must stay
within the budget. The figures (requests, failures, latency percentiles, slot
bytes against the budget) are written to ``soak.json`` in the test's folder
and printed, for the closing notes.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.server_utils import serve, scrape, total

pytestmark = [pytest.mark.slow, pytest.mark.engine]

NUM_REQUESTS = 64
MAX_TOKENS = 24
#: the whole soak must end within this (the tiny model needs a few seconds)
DEADLINE_S = 300
#: mixed prompt lengths: 1 to ~190 bytes (the tiny byte tokenizer: one token per byte)
PROMPTS = [("The quick brown fox jumps over the lazy dog. " * 5)[: 1 + (i * 37) % 190] for i in range(NUM_REQUESTS)]
FLAGS = ("--moe-offload", "fate", "--moe-offload-budget", "25%", "--max-num-seqs", "64")


async def _one(client, prompt: str) -> dict:
    started = time.perf_counter()
    text, first_s = [], None
    try:
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices:
                first_s = first_s or time.perf_counter() - started
                text.append(chunk.choices[0].text)
        return {"text": "".join(text), "latency_s": time.perf_counter() - started, "ttft_s": first_s}
    except Exception as exc:  # noqa: BLE001 - a failure must carry a reason, which the test checks
        return {"error": f"{type(exc).__name__}: {exc}", "latency_s": time.perf_counter() - started}


async def _all(server, prompts) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=DEADLINE_S)
    return await asyncio.wait_for(asyncio.gather(*(_one(client, p) for p in prompts)), DEADLINE_S)


async def _sequential(server, prompts) -> list[dict]:
    return [await _all(server, [p]) for p in prompts]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_64_concurrent_streams_at_25_percent(tiny_models, tmp_path):
    model = tiny_models["mixtral"]
    with serve(model, tmp_path / "stock", stock=True) as server:
        # one at a time: the reference does not depend on how requests were batched
        reference = [r[0] for r in asyncio.run(_sequential(server, PROMPTS))]
    assert all("error" not in r for r in reference)
    with serve(model, tmp_path / "offload", FLAGS) as server:
        started = time.perf_counter()
        results = asyncio.run(_all(server, PROMPTS))
        wall_s = time.perf_counter() - started
        samples = scrape(server.url)
    failures = [r for r in results if "error" in r]
    for r in failures:
        assert r["error"], "a failed request must say why"
    done = [r for r in results if "error" not in r]
    mismatches = [i for i, (r, ref) in enumerate(zip(results, reference)) if "error" not in r and r["text"] != ref["text"]]
    latencies = [r["latency_s"] for r in done]
    slot_bytes = total(samples, "vllm:moe_offload_slot_bytes")
    budget_bytes = total(samples, "vllm:moe_offload_budget_bytes")
    peak_held_bytes = total(samples, "vllm:moe_offload_peak_held_bytes")  # slots and staging, at most
    figures = {
        "requests": NUM_REQUESTS, "finished": len(done), "failed": len(failures), "mismatched_vs_stock": len(mismatches),
        "wall_s": wall_s, "p50_latency_s": _percentile(latencies, 0.5), "p99_latency_s": _percentile(latencies, 0.99),
        "p50_ttft_s": _percentile([r["ttft_s"] for r in done], 0.5),
        "slot_bytes": slot_bytes, "peak_held_bytes": peak_held_bytes, "budget_bytes": budget_bytes,
        "hits": total(samples, "vllm:moe_offload_hits_total"), "misses": total(samples, "vllm:moe_offload_misses_total"),
    }
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=1))
    print("soak figures:", json.dumps(figures))
    assert not failures, failures[:3]
    assert not mismatches, f"requests {mismatches} differ from stock"
    assert 0 < slot_bytes < peak_held_bytes <= budget_bytes
