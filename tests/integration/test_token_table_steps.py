"""The next-token prefetcher's bookkeeping on real slot pools, without an engine: what each step teaches the
table, and that a sampled token is predicted once, before the forward that takes it as input."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.v1.outputs import ModelRunnerOutput

from tests.runtime.test_slots import _slots, experts  # noqa: F401 (fixture)
from vllm_moe_offload.integration.token_prefetch import _FEW_ROWS, TokenPrefetch


def _prefetcher(folder, num_layers=2, num_slots=4):
    layers = [SimpleNamespace(slots=_slots(folder, num_slots)) for _ in range(num_layers)]
    return TokenPrefetch(layers, gated=False), layers


def _forward(prefetcher, input_ids: list[int]) -> None:
    prefetcher._before_forward(None, (), {"input_ids": torch.tensor(input_ids)})


def test_each_token_keeps_its_last_row_in_small_and_big_steps(experts):  # noqa: F811
    folder, _ = experts
    prefetcher, layers = _prefetcher(folder)
    _forward(prefetcher, [7, 8, 7])
    layers[0].observe_tokens(torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert list(prefetcher.routes.predict(0, 7)) == [4, 5] and list(prefetcher.routes.predict(0, 8)) == [2, 3]
    big = [100 + i % 40 for i in range(_FEW_ROWS + 36)]  # 40 distinct tokens, each several times
    rows = torch.tensor([[i % 6, (i + 1) % 6] for i in range(len(big))])
    _forward(prefetcher, big)
    layers[1].observe_tokens(rows)
    for token in set(big):
        last = max(i for i, t in enumerate(big) if t == token)
        assert list(prefetcher.routes.predict(1, token)) == rows[last].tolist()
    layers[0].observe_tokens(rows[:10])  # rows that do not match the step's tokens teach nothing
    assert prefetcher.routes.predict(0, 100) == ()
    for layer in layers:
        layer.slots.engine.shutdown()


def test_a_sampled_token_is_predicted_once_before_the_forward_that_takes_it(experts):  # noqa: F811
    folder, _ = experts
    prefetcher, layers = _prefetcher(folder)
    _forward(prefetcher, [5])
    layers[0].observe_tokens(torch.tensor([[0, 1]]))
    layers[1].observe_tokens(torch.tensor([[2, 3]]))
    for layer in layers:
        layer.slots.end_step()
    sampled = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[5]])
    prefetcher.after_sampling(sampled)  # both layers' experts load before the next forward
    assert [layer.slots.stats.prefetch_loads for layer in layers] == [2, 2]
    _forward(prefetcher, [5])  # the sampled token: predicted already, not again
    for layer, need in zip(layers, ([0, 1], [2, 3])):
        layer.slots.ensure(need)
        stats = layer.slots.stats
        assert (stats.token_table_predicted, stats.token_table_right, stats.prefetch_hits) == (2, 2, 2)
        layer.slots.end_step()
    two = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1}, sampled_token_ids=[[5], [5]])
    prefetcher.after_sampling(two)  # two requests: no batch-1 step follows, nothing is predicted
    assert [layer.slots.stats.token_table_predicted for layer in layers] == [2, 2]
    assert all(not layer.slots._other_predictions for layer in layers)
    for layer in layers:
        layer.slots.engine.shutdown()
