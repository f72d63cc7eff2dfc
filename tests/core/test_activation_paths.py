"""The serving-side activation paths (MoE-Infinity style): matching, fallbacks, history bound."""

import numpy as np
import pytest

from vllm_moe_offload.core.activation_paths import ActivationPaths


def test_a_request_is_matched_to_the_finished_request_whose_path_it_follows():
    paths = ActivationPaths(num_layers=2, num_experts=6)
    # two finished requests: one used experts 0,1 then 2,3; the other 4,5 then 0,1
    paths.observe(["a", "a"], 0, np.array([[0, 1], [0, 1]]))
    paths.observe(["a", "a"], 1, np.array([[2, 3], [2, 3]]))
    paths.observe(["b"], 0, np.array([[4, 5]]))
    paths.observe(["b"], 1, np.array([[0, 1]]))
    paths.finish(["a", "b"])
    assert len(paths) == 2 and paths.live() == set()
    paths.observe(["c"], 0, np.array([[4, 5]]))  # follows b so far
    assert paths.predict(["c"], 1, 2) == [0, 1]
    paths.observe(["d", None], 0, np.array([[0, 1], [5, 4]]))  # padding rows are ignored
    assert paths.predict(["d"], 1, 2) == [2, 3]
    # a step with both: the rankings are normalised and added
    assert set(paths.predict(["c", "d"], 1, 4)) == {0, 1, 2, 3}


def test_fallbacks_without_history_or_counts():
    paths = ActivationPaths(num_layers=2, num_experts=4)
    assert paths.predict(["x"], 1, 2) == []  # nothing known
    paths.observe(["x"], 1, np.array([[3, 1]]))
    assert paths.predict(["x"], 1, 2) == [1, 3]  # own counts, ties by id
    paths.finish(["x"])
    assert paths.predict(["new"], 1, 1) == [1]  # no counts yet: the history's sum
    paths.finish(["never-seen"])  # harmless
    assert len(paths) == 1


def test_history_is_bounded_and_bad_sizes_are_refused():
    paths = ActivationPaths(num_layers=1, num_experts=2, max_history=3)
    for i in range(5):
        paths.observe([str(i)], 0, np.array([[i % 2]]))
        paths.finish([str(i)])
    assert len(paths) == 3
    with pytest.raises(ValueError, match="max_history"):
        ActivationPaths(1, 2, max_history=0)
