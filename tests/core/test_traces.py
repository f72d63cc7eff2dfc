"""The trace model, its .npz format, and the readers of ../shared/traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.core.tracegen import make_trace
from vllm_moe_offload.core.traces import TraceMeta, TraceWriter, load_trace, save_trace, with_meta

SHARED_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"

META = TraceMeta(model="m", num_layers=4, num_experts=8, top_k=2, layer_ids=(1, 3), expert_bytes=1000)


def _written(tmp_path: Path, hidden: bool) -> tuple:
    writer = TraceWriter(META)
    rng = np.random.default_rng(0)
    steps = []
    for step, num_tokens in enumerate((3, 1)):
        ids = [rng.integers(0, 8, (num_tokens, 2)) for _ in range(2)]  # per layer [T, k]
        weights = [rng.random((num_tokens, 2)) for _ in range(2)]
        h = rng.standard_normal((num_tokens, 2, 5)) if hidden else None
        writer.add_step(list(range(num_tokens)), [step] * num_tokens, ids, weights, token_ids=None, hidden=h)
        steps.append((ids, weights, h))
    return writer.write(tmp_path / "t.npz"), steps


@pytest.mark.parametrize("hidden", [False, True])
def test_round_trip(tmp_path, hidden):
    path, steps = _written(tmp_path, hidden)
    trace = load_trace(path)
    assert trace.meta == META
    assert trace.num_tokens == 4 and trace.num_trace_layers == 2
    assert trace.topk_ids.dtype == np.int16 and trace.topk_weights.dtype == np.float32
    np.testing.assert_array_equal(trace.topk_ids[:3, 1], steps[0][0][1])
    np.testing.assert_allclose(trace.topk_weights[3, 0], steps[1][1][0][0], rtol=1e-6)
    np.testing.assert_array_equal(trace.step_ids, [0, 0, 0, 1])
    np.testing.assert_array_equal(trace.seq_ids, [0, 1, 2, 0])
    np.testing.assert_array_equal(trace.token_ids, [-1] * 4)
    if hidden:
        assert trace.hidden.dtype == np.float16 and trace.hidden.shape == (4, 2, 5)
        np.testing.assert_allclose(trace.hidden[3], steps[1][2][0], atol=1e-2)
    else:
        assert trace.hidden is None


def test_npz_needs_no_pickle_and_says_its_format(tmp_path):
    path, _ = _written(tmp_path, hidden=False)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"meta", "topk_ids", "topk_weights", "token_ids", "seq_ids", "positions", "step_ids"}
        assert '"format_version": 1' in str(data["meta"])


def test_writer_refuses_inconsistent_steps():
    writer = TraceWriter(META)
    with pytest.raises(ValueError, match="no step"):
        writer.to_trace()
    ids = np.zeros((2, 2, 2), np.int64)
    writer.add_step([0, 1], [0, 0], ids, ids.astype(float))
    with pytest.raises(ValueError, match="hidden"):
        writer.add_step([0, 1], [1, 1], ids, ids.astype(float), hidden=np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="rows"):
        writer.add_step([0], [1, 1], ids, ids.astype(float))


def test_trace_validates_ids_and_shapes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        make_trace([[[0, 4]]], num_experts=4)
    trace = make_trace([[[0, 1]]], num_experts=4)
    with pytest.raises(ValueError, match="layers"):
        with_meta(trace, layer_ids=(0, 1))


def test_newer_format_version_is_refused(tmp_path):
    trace = make_trace([[[0, 1]]], num_experts=4)
    path = save_trace(trace, tmp_path / "t.npz")
    data = dict(np.load(path))
    data["meta"] = np.array(str(data["meta"]).replace('"format_version": 1', '"format_version": 99'))
    np.savez(tmp_path / "new.npz", **data)
    with pytest.raises(ValueError, match="version 99"):
        load_trace(tmp_path / "new.npz")


def test_sequence_and_step_rows():
    trace = make_trace(
        [[[0]], [[1]], [[2]], [[3]]], num_experts=4,
        seq_ids=[1, 0, 1, 0], positions=[1, 0, 0, 1], step_ids=[1, 0, 0, 1],
    )
    assert trace.sequences() == [1, 0]
    np.testing.assert_array_equal(trace.sequence_rows(1), [2, 0])
    assert [r.tolist() for r in trace.step_rows()] == [[1, 2], [0, 3]]


def _shared(name: str) -> Path:
    path = SHARED_TRACES / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def test_read_mixtral_jsonl():
    trace = load_trace(_shared("mixtral-8x7b-humaneval-decode.jsonl"))
    meta = trace.meta
    assert (meta.num_layers, meta.num_experts, meta.top_k) == (32, 8, 2)
    assert meta.layer_ids == tuple(range(32)) and meta.seq_names == ("0", "1")
    assert trace.topk_ids.shape == (333, 32, 2)
    assert (trace.token_ids >= 0).all()
    # Both prompts decode together: a row's step is its rank within its sequence.
    np.testing.assert_array_equal(trace.step_ids, trace.positions)
    assert len(trace.step_rows()) == 252


def test_read_qwen_jsonl():
    trace = load_trace(_shared("qwen1.5-moe-a2.7b-5layers.jsonl"))
    meta = trace.meta
    assert (meta.num_layers, meta.num_experts, meta.top_k) == (24, 60, 4)
    assert meta.layer_ids == (0, 8, 12, 18, 23)
    assert trace.topk_ids.shape == (4357, 5, 4)
    assert (trace.token_ids == -1).all() and trace.sequences() == [0]
    # One req_id whose pos restarts 128 times: 129 forward batches, the prefill one 1406 tokens.
    sizes = [len(r) for r in trace.step_rows()]
    assert len(sizes) == 129 and sizes[:3] == [65, 1406, 25] and sizes[-1] == 11
