"""``vllm serve --moe-offload lru`` end to end with the ``openai`` client: same greedy tokens as stock, metrics.

Two server start-ups for the whole module (each ~25 s): stock vLLM answers a
fixed set of requests first and stops; then the offload server answers the same
requests and the tests compare. Never two engines at once (2-core machines).
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import PROMPTS
from tests.server_utils import CHAT_TEMPLATE, scrape, serve, total

pytestmark = [pytest.mark.slow, pytest.mark.engine]

OFFLOAD_FLAGS = ("--moe-offload", "lru", "--moe-offload-budget", "50%", "--chat-template", CHAT_TEMPLATE)
MAX_TOKENS = 16
CHAT = [{"role": "user", "content": "Hello, world"}]


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _complete(client, prompt) -> list[int]:
    done = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert done.usage.completion_tokens == MAX_TOKENS
    return done.choices[0].token_ids


def _chat(client) -> str:
    done = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True},
    )
    return done.choices[0].message.content


def _stream(client, prompt) -> str:
    chunks = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def _answers(server) -> dict:
    client = _client(server)
    return {
        "completions": [_complete(client, p) for p in PROMPTS],
        "chat": _chat(client),
        "stream": _stream(client, PROMPTS[2]),
    }


@pytest.fixture(scope="module")
def stock_answers(tiny_models, tmp_path_factory) -> dict:
    flags = ("--chat-template", CHAT_TEMPLATE)
    with serve(tiny_models["mixtral"], tmp_path_factory.mktemp("stock"), flags, stock=True) as server:
        return _answers(server)


@pytest.fixture(scope="module")
def offload_server(stock_answers, tiny_models, tmp_path_factory):
    """The offload server (requested after ``stock_answers`` so the stock one is gone)."""
    with serve(tiny_models["mixtral"], tmp_path_factory.mktemp("offload"), OFFLOAD_FLAGS) as server:
        yield server


def test_completions_chat_and_stream_match_stock(offload_server, stock_answers):
    assert _answers(offload_server) == stock_answers
    log = offload_server.log.read_text()
    assert "MoE offload ready" in log and "policy lru" in log


def test_concurrent_requests_match_stock(offload_server, stock_answers):
    client = _client(offload_server)
    got: list[tuple[int, list[int]]] = []

    def one(i: int) -> None:
        got.append((i, _complete(client, PROMPTS[i])))

    # every prompt twice, all in flight together: batched decode steps
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(got) == len(threads)
    for i, tokens in got:
        assert tokens == stock_answers["completions"][i], i


def test_cancelled_stream_leaves_the_server_serving(offload_server, stock_answers):
    client = _client(offload_server)
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=400, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client hangs up mid-generation
    assert _complete(client, PROMPTS[1]) == stock_answers["completions"][1]
    assert _stream(client, PROMPTS[2]) == stock_answers["stream"]


def _needs(samples) -> float:
    return total(samples, "vllm:moe_offload_hits_total") + total(samples, "vllm:moe_offload_misses_total")


def _scrape_until(url: str, done, timeout_s: float = 15) -> dict:
    """Scrape until ``done(samples)`` (the poller refreshes once a second); the last scrape at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_metrics_are_scraped_and_move(offload_server):
    # the earlier tests' requests are counted within a poll interval
    before = _scrape_until(offload_server.url, lambda s: _needs(s) > 0)
    for name in ("vllm:moe_offload_hits_total", "vllm:moe_offload_misses_total",
                 "vllm:moe_offload_prefetch_hits_total", "vllm:moe_offload_stall_seconds_total",
                 "vllm:moe_offload_loads_total", "vllm:moe_offload_bytes_read_total",
                 "vllm:moe_offload_resident_experts", "vllm:moe_offload_slots", "vllm:moe_offload_slot_bytes",
                 "vllm:moe_offload_budget_bytes", "vllm:moe_offload_info"):
        assert any(sample == name for sample, _ in before), name
    assert 0 < total(before, "vllm:moe_offload_slot_bytes") <= total(before, "vllm:moe_offload_budget_bytes")
    assert any(dict(labels).get("policy") == "lru" for name, labels in before if name == "vllm:moe_offload_info")
    # vLLM's own metrics are still there, in the same registry
    assert any(sample == "vllm:num_requests_running" for sample, _ in before)

    _complete(_client(offload_server), PROMPTS[3])
    after = _scrape_until(offload_server.url, lambda s: _needs(s) > _needs(before))
    assert _needs(after) > _needs(before)
    tiers = {dict(labels)["tier"] for name, labels in after if name == "vllm:moe_offload_bytes_read_total"}
    assert tiers == {"disk"} and total(after, "vllm:moe_offload_bytes_read_total") > 0


def test_client_example_runs_against_the_server(offload_server):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "serve_openai_client.py"), "--base-url", offload_server.url,
         "--model", "tiny", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "completion: " in out.stdout and "chat: " in out.stdout and "stream: " in out.stdout
    assert "vllm:moe_offload_budget_bytes" in out.stdout
