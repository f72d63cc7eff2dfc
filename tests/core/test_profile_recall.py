"""The optional prediction-recall field of activation profiles (Fate's resident-layer choice)."""

import json

import numpy as np
import pytest

from vllm_moe_offload.core.correlation import CorrelationTable, ProfileError, load_profile
from vllm_moe_offload.core.stats import LayerStats, layer_recall


def _table() -> CorrelationTable:
    table = CorrelationTable(3, 4, 2, model="m")
    table.update(0, None, [[0, 1]])
    return table


def test_recall_round_trips_and_unmeasured_layers_stay_nan(tmp_path):
    table = _table()
    table.note_recall([None, 0.5, 0.75])
    loaded = load_profile(table.save(tmp_path / "p.npz"))
    assert np.isnan(loaded.prediction_recall[0]) and loaded.prediction_recall[1:].tolist() == [0.5, 0.75]  # float32-exact
    loaded.note_recall([None, None, 0.625])  # a later run measured only the last layer
    assert loaded.prediction_recall[1:].tolist() == [0.5, 0.625]


def test_profiles_without_recall_or_with_an_unknown_version_load_without_it(tmp_path):
    table = _table()
    assert load_profile(table.save(tmp_path / "old.npz")).prediction_recall is None
    table.note_recall([0.1, 0.2, 0.3])
    path = table.save(tmp_path / "new.npz")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["prediction_recall_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **arrays)
    loaded = load_profile(tmp_path / "future.npz")
    assert loaded.prediction_recall is None and loaded.counts.sum() == 2


def test_a_malformed_recall_is_refused(tmp_path):
    table = _table()
    table.prediction_recall = np.array([0.1, 1.5, 0.2])
    with pytest.raises(ProfileError, match="prediction_recall"):
        load_profile(table.save(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="2 recall values for 3 layers"):
        table.note_recall([0.1, 0.2])


def test_layer_recall_reads_the_distance_one_counts():
    measured, unmeasured = LayerStats(), LayerStats()
    measured.add_distance(1, predicted=4, right=3, needed=4)
    measured.add_distance(2, predicted=4, right=1, needed=4)
    assert layer_recall([measured, unmeasured]) == [0.75, None]
    assert layer_recall([measured], distance=2) == [0.25]
