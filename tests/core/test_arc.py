"""ARC's notion of a useful expert, which Fate's prefetches must not evict."""

import pytest

from tests.conftest import use_expert
from vllm_moe_offload.core.arc import ARCPolicy
from vllm_moe_offload.core.cache import SlotMap


def test_frequent_or_last_step_experts_are_useful_others_not():
    arc = ARCPolicy(16, 3)
    slots = SlotMap(16, 3, arc)
    use_expert(slots, 0)
    use_expert(slots, 0)  # in T2: frequent
    use_expert(slots, 1)  # T1, used this step
    use_expert(slots, 2)
    for _ in range(3):
        slots.end_step()
    use_expert(slots, 2)  # T2 now, but let 1 age
    slots.end_step()
    slots.end_step()
    assert 0 in arc.t2 and slots.useful(0)  # frequent, however old
    assert 1 in arc.t1 and not slots.useful(1)  # seen once, 5 steps ago
    assert slots.admit(9, spare_useful=True).evicted == 1


def test_t1_expert_of_the_last_step_is_spared_and_a_refusal_changes_nothing():
    arc = ARCPolicy(16, 2)
    slots = SlotMap(16, 2, arc)
    use_expert(slots, 0)
    use_expert(slots, 0)  # T2
    use_expert(slots, 1)  # T1
    slots.end_step()
    use_expert(slots, 2)  # evicts 1 (T1) into the ghost list B1 ... 
    assert 1 in arc.b1 and slots.steps_since_use(2) == 0
    slots.end_step()
    state = (arc.p, list(arc.t1), list(arc.t2), list(arc.b1), list(arc.b2))
    with pytest.raises(RuntimeError, match="or useful ones"):
        slots.admit(1, spare_useful=True)  # a ghost: a real admission would move p
    assert (arc.p, list(arc.t1), list(arc.t2), list(arc.b1), list(arc.b2)) == state
    slots.end_step()  # 2 was used 2 steps ago and is in T1: no longer useful to ARC
    assert slots.admit(1, spare_useful=True).evicted == 2
    assert arc.p == 1.0  # the ghost hit adapted the target as on any admission
