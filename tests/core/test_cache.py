"""SlotMap with the runtime's policies: capacity, pinning, Load-on-Demand drops, pass packing."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import use_expert
from vllm_moe_offload.core.cache import LRUPolicy, OnDemandPolicy, SlotMap, pack_passes
from vllm_moe_offload.core.replacement import make_policy


def test_lru_evicts_least_recent_unpinned():
    slots = SlotMap(8, 2, LRUPolicy(8, 2))
    for expert in (0, 1):
        slots.admit(expert)
        slots.touch(expert, hit=False)
    slots.touch(0, hit=True)  # 1 is now least recent
    assert slots.admit(2, pinned={2}).evicted == 1
    slots.touch(2, hit=False)
    assert slots.admit(3, pinned={0, 3}).evicted == 2  # 2 is older than 0 but 0 is pinned anyway


def test_all_pinned_is_an_error_not_an_overflow():
    slots = SlotMap(8, 2, LRUPolicy(8, 2))
    slots.admit(0)
    slots.admit(1)
    with pytest.raises(RuntimeError, match="all 2 slots hold experts the current pass needs"):
        slots.admit(2, pinned={0, 1})
    assert len(slots) == 2


def test_ondemand_keeps_fixed_set_and_drops_the_rest_each_step():
    policy = OnDemandPolicy(8, 5, scratch=2)
    assert policy.warm_set() == [0, 1, 2]
    slots = SlotMap(8, 5, policy)
    for expert in policy.warm_set():
        slots.admit(expert)
    slots.admit(6, pinned={6})
    assert slots.end_step() == [6]
    assert set(slots.resident()) == {0, 1, 2}


def test_ondemand_with_every_slot_keeps_everything():
    policy = make_policy("ondemand", 8, 8, top_k=2)
    assert policy.warm_set() == list(range(8))
    assert all(policy.keep_after_step(e) for e in range(8))


def test_unknown_policy_names_allowed():
    allowed = r"\['arc', 'decay', 'ewma', 'lfru', 'log2decay', 'lru', 'nextuse', 'ondemand'\]"
    with pytest.raises(ValueError, match=r"unknown cache policy 'mru'; allowed: " + allowed):
        make_policy("mru", 8, 4, 2)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(2, 6),
    policy_name=st.sampled_from(["lru", "ondemand", "arc"]),
    steps=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=2, unique=True), min_size=1, max_size=40),
)
def test_capacity_never_exceeded_and_needed_experts_resident(capacity, policy_name, steps):
    slots = SlotMap(8, capacity, make_policy(policy_name, 8, capacity, top_k=2))
    for needed in steps:
        for expert in needed:
            if slots.slot_of(expert) is None:
                slots.admit(expert, pinned=set(needed))
            slots.touch(expert, hit=False)
        assert len(slots) <= capacity
        assert all(slots.slot_of(e) is not None for e in needed)
        used = [slots.slot_of(e) for e in slots.resident()]
        assert len(set(used)) == len(used) and all(0 <= s < capacity for s in used)
        slots.end_step()


@settings(max_examples=200, deadline=None)
@given(
    num_slots=st.integers(2, 6),
    tokens=st.lists(st.lists(st.integers(0, 15), min_size=2, max_size=2, unique=True), min_size=1, max_size=50),
)
def test_pack_passes_keeps_tokens_whole_and_within_slots(num_slots, tokens):
    passes = pack_passes(tokens, num_slots)
    assert sorted(i for p in passes for i in p) == list(range(len(tokens)))
    for p in passes:
        assert len({e for i in p for e in tokens[i]}) <= num_slots


def _pass_loads(passes, rows, num_slots, resident=()):
    """Loads of running ``passes`` in order through an LRU slot cache, each pass's experts pinned."""
    slots = SlotMap(16, num_slots, LRUPolicy(16, num_slots))
    for expert in resident:
        slots.admit(expert)
        slots.touch(expert, hit=False)
    loads = 0
    for tokens in passes:
        needed = {e for i in tokens for e in rows[i]}
        for expert in sorted(needed):
            if slots.slot_of(expert) is None:
                loads += 1
                slots.admit(expert, pinned=needed)
                slots.touch(expert, hit=False)
            else:
                slots.touch(expert, hit=True)
    return loads


def test_planned_passes_reuse_what_the_pass_before_left():
    from vllm_moe_offload.core.cache import _pack_sorted

    rows = [list(pair) for pair in itertools.combinations(range(6), 2)]  # every pair of 6 experts
    for num_slots, planned, in_sorted_order in ((3, 12, 15), (4, 9, 10)):
        assert _pass_loads(pack_passes(rows, num_slots), rows, num_slots) == planned
        assert _pass_loads(_pack_sorted([frozenset(r) for r in rows], num_slots), rows, num_slots) == in_sorted_order


def test_the_first_pass_is_served_by_the_resident_experts():
    rows = [[0, 1], [2, 3], [4, 5], [2, 4]]
    passes = pack_passes(rows, 2, resident={4, 5})
    assert passes == [[2], [3], [1], [0]] and _pass_loads(passes, rows, 2, resident=[4, 5]) == 4
    assert pack_passes(rows, 2)[0] == [0]  # nothing resident: the lowest experts first


def test_pack_passes_refuses_a_token_wider_than_the_slots():
    with pytest.raises(ValueError, match="token 0 needs 3 experts but only 2 slots exist"):
        pack_passes([[0, 1, 2]], 2)


def test_arc_keeps_the_frequent_expert_through_a_scan():
    """Expert 0 is used again and again; a scan of one-off experts must not push it out (LRU would)."""
    from vllm_moe_offload.core.arc import ARCPolicy

    def run(policy):
        slots = SlotMap(16, 3, policy)
        misses = 0
        for expert in [0, 1, 0, 2, 0, 3, 4, 5, 0, 6, 7, 0]:
            if slots.slot_of(expert) is None:
                misses += 1
                slots.admit(expert, pinned={expert})
                slots.touch(expert, hit=False)
            else:
                slots.touch(expert, hit=True)
        return misses, slots.slot_of(0) is not None

    arc_misses, arc_keeps_0 = run(ARCPolicy(16, 3))
    assert arc_keeps_0 and arc_misses == 8  # 0 misses once; 1..7 once each


def test_arc_ghost_hit_moves_the_target():
    from vllm_moe_offload.core.arc import ARCPolicy

    arc = ARCPolicy(8, 2)
    slots = SlotMap(8, 2, arc)

    def use(expert):
        if slots.slot_of(expert) is None:
            slots.admit(expert, pinned={expert})
            slots.touch(expert, hit=False)
        else:
            slots.touch(expert, hit=True)

    for expert in (0, 0, 1, 2):  # 0 is frequent (T2); 2 pushes 1 out of T1 into the ghost list B1
        use(expert)
    assert 1 in arc.b1 and 0 in arc.t2 and arc.p == 0
    slots.admit(1, pinned={1})  # a ghost hit: T1 should have been larger
    assert arc.p == 1.0 and 1 not in arc.b1
    slots.touch(1, hit=False)
    assert 1 in arc.t2


def test_prefetch_admission_spares_experts_used_in_the_last_two_steps():
    slots = SlotMap(8, 2, LRUPolicy(8, 2))
    use_expert(slots, 0)
    slots.end_step()
    use_expert(slots, 1)
    slots.end_step()
    assert slots.steps_since_use(0) == 2 and slots.steps_since_use(1) == 1
    with pytest.raises(RuntimeError, match="or useful ones"):
        slots.admit(5, spare_useful=True)
    assert slots.resident() == {0: 0, 1: 1}  # nothing changed on refusal
    assert slots.admit(5).evicted == 0  # a demand load evicts as before
    slots.end_step()
    slots.end_step()
    # 1 was last used 3 steps ago: a prefetch may take its slot; 5 came in without a use
    assert not slots.useful(1) and not slots.useful(5)
    assert slots.admit(6, spare_useful=True).evicted == 5  # never accessed: LRU's oldest
    slots.touch(6, hit=False, demand=False)
    assert slots.admit(7, spare_useful=True, pinned={6}).evicted == 1


def test_a_prefetched_expert_never_used_is_not_useful():
    slots = SlotMap(8, 2, LRUPolicy(8, 2))
    slots.admit(3)
    slots.touch(3, hit=False, demand=False)  # a prefetch: no pass used it
    assert slots.steps_since_use(3) is None and not slots.useful(3)
    slots.touch(3, hit=True)
    assert slots.steps_since_use(3) == 0 and slots.useful(3)
    slots.drop(3)
    assert slots.steps_since_use(3) is None


def test_prefetch_admission_takes_a_free_slot_whatever_is_useful():
    slots = SlotMap(8, 2, LRUPolicy(8, 2))
    use_expert(slots, 0)
    assert slots.admit(1, spare_useful=True).evicted is None
    slots.touch(1, hit=True)  # a pass used it
    with pytest.raises(RuntimeError):
        slots.admit(2, spare_useful=True)


@settings(max_examples=50, deadline=None)
@given(
    policy_name=st.sampled_from(["lru", "arc"]),
    ops=st.lists(st.tuples(st.sampled_from(["use", "prefetch", "end"]), st.integers(0, 7)), max_size=60),
)
def test_prefetch_never_evicts_a_useful_expert(policy_name, ops):
    slots = SlotMap(8, 3, make_policy(policy_name, 8, 3, top_k=2))
    for op, expert in ops:
        if op == "end":
            slots.end_step()
        elif op == "use":
            use_expert(slots, expert)
        elif slots.slot_of(expert) is None:
            useful = {e for e in slots.resident() if slots.useful(e)}
            try:
                evicted = slots.admit(expert, spare_useful=True).evicted
            except RuntimeError:
                assert len(useful) == len(slots) == slots.num_slots
                continue
            assert evicted is None or evicted not in useful
            slots.touch(expert, hit=False, demand=False)
        assert len(slots) <= slots.num_slots
