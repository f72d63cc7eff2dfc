"""The configuration object and the slot plan: validation messages and budget arithmetic."""

import pytest

from vllm_moe_offload.core.config import Budget, OffloadConfig, OffloadConfigError, Policy, Quant, Tier
from vllm_moe_offload.core.plan import minimum_bytes, plan_slots


@pytest.mark.parametrize(
    "text, num_bytes",
    [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1048576", 2**20),
     ("64 kib", 64 * 1024), ("2G", 2 * 2**30), (123, 123)],
)
def test_budget_sizes(text, num_bytes):
    assert Budget.parse(text).num_bytes == num_bytes


def test_budget_share():
    budget = Budget.parse("12.5%")
    assert budget.fraction == 0.125 and budget.resolve(800) == 100 and str(budget) == "12.5%"


@pytest.mark.parametrize("bad", ["", "abc", "4 GiBs", "-1GiB", "0", "0%", "101%", True, None, [1], 0.0])
def test_bad_budgets_name_value_and_allowed(bad):
    with pytest.raises(OffloadConfigError, match="allowed: auto, a size such as 4GiB"):
        Budget.parse(bad)


def test_defaults_off_and_frozen():
    config = OffloadConfig.from_dict(None)
    assert not config.enabled and config.policy is Policy.OFF
    with pytest.raises(AttributeError):
        config.policy = Policy.LRU  # type: ignore[misc]


def test_the_prefetch_gate_is_on_unless_switched_off():
    assert OffloadConfig.from_dict({"policy": "fate"}).prefetch_gate
    off = OffloadConfig.from_dict({"policy": "fate", "prefetch_gate": "off"})
    assert not off.prefetch_gate and OffloadConfig.from_dict(off.to_dict()) == off


def test_token_prefetch_is_fates_unless_switched():
    assert OffloadConfig.from_dict({"policy": "fate"}).token_prefetch_on
    assert not OffloadConfig.from_dict({"policy": "lru"}).token_prefetch_on
    assert not OffloadConfig.from_dict({"policy": "ondemand"}).token_prefetch_on
    on = OffloadConfig.from_dict({"policy": "lru", "token_prefetch": "on"})
    off = OffloadConfig.from_dict({"policy": "fate", "token_prefetch": False})
    assert on.token_prefetch_on and not off.token_prefetch_on
    assert OffloadConfig.from_dict(on.to_dict()) == on and OffloadConfig.from_dict(off.to_dict()) == off


def test_round_trip_through_dict():
    config = OffloadConfig.from_dict({"policy": "LRU", "budget": "25%", "tier": "disk", "io_threads": 2})
    assert config.policy is Policy.LRU and config.tier is Tier.DISK and config.io_threads == 2
    assert OffloadConfig.from_dict(config.to_dict()) == config
    by_bytes = OffloadConfig.from_dict({"policy": "lru", "budget": "1GiB"})
    assert OffloadConfig.from_dict(by_bytes.to_dict()) == by_bytes


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"polcy": "lru"}, r"unknown moe_offload key\(s\) \['polcy'\]; allowed keys: \["),
        ({"policy": "mru"}, r"policy 'mru' is not one of \['off', 'ondemand', 'lru', 'fate', 'klotski', 'eap'\]"),
        ({"profile": "/no/such/profile.npz"}, r"profile '/no/such/profile.npz' is not a file"),
        ({"save_profile": "/no/such/dir/p.npz"}, "its directory does not exist"),
        ({"load_timeout_s": 200, "io_stuck_s": 100}, r"io_stuck_s 100(\.0)? must exceed load_timeout_s 200"),
        ({"tier": "tape"}, r"tier 'tape' is not one of \['auto', 'disk', 'host'\]"),
        ({"io_threads": 1.5}, "io_threads 1.5 is not a int"),
        ({"io_threads": 100}, "io_threads 100 is out of range; allowed: 1 to 64"),
        ({"direct_io": "yes"}, "direct_io 'yes' must be true or false"),
        ({"quant": "int8"}, r"quant 'int8' is not one of \['none', 'int4', 'int4\+int2'\]"),
        ({"quant": "int4", "tier": "host"}, "quant 'int4' contradicts tier 'host'"),
        ({"store": "kernel", "quant": "int4"}, "store 'kernel' holds full-precision experts and quant 'int4'"),
        ({"store": "kernel", "tier": "host"}, "store 'kernel' contradicts tier 'host'"),
        ({"store": "zipped"}, r"store 'zipped' is not one of \['checkpoint', 'kernel', 'packed'\]"),
        ({"store": "packed", "quant": "int4"}, "store 'packed' holds full-precision experts and quant 'int4'"),
        ({"link_gbps": -1}, "link_gbps -1 is out of range"),
        ({"policy": "fate", "prefetch_gate": "maybe"}, r"prefetch_gate 'maybe' must be true or false \(or on/off\)"),
        ({"policy": "ondemand", "token_prefetch": True}, r"token_prefetch needs a policy with a cache .*not 'ondemand'"),
        ("lru", "moe_offload must be a dict"),
    ],
)
def test_bad_settings(raw, message):
    with pytest.raises(OffloadConfigError, match=message):
        OffloadConfig.from_dict(raw)


def test_plan_even_split_never_above_budget():
    plan = plan_slots(Budget(num_bytes=10_000), num_layers=4, num_experts=8, top_k=2, expert_bytes=600)
    assert plan.slots_per_layer == 4  # 10000 // (4 * 600) = 4
    assert plan.slot_bytes == 9600 <= plan.budget_bytes


def test_plan_caps_at_everything_resident():
    plan = plan_slots(Budget(num_bytes=10**9), num_layers=2, num_experts=8, top_k=2, expert_bytes=100)
    assert plan.slots_per_layer == 8 and plan.fully_resident


def test_plan_minimum_is_top_k_per_layer_and_stated_in_bytes():
    assert minimum_bytes(num_layers=3, top_k=2, expert_bytes=100) == 600
    assert plan_slots(Budget(num_bytes=600), 3, 8, 2, 100).slots_per_layer == 2
    with pytest.raises(OffloadConfigError, match=r"minimum one step needs: 600 bytes .* allowed: 600 to 2400 bytes"):
        plan_slots(Budget(num_bytes=599), 3, 8, 2, 100)
    with pytest.raises(OffloadConfigError, match="minimum"):
        plan_slots(Budget(fraction=0.2), 3, 8, 2, 100)  # 1 slot of 8


def test_shallow_favoring_split_keeps_leading_layers_whole():
    # 4 layers of 8 experts, budget 20 slots: 1 resident layer (8) + 3 x 4
    plan = plan_slots(Budget(num_bytes=20 * 100), 4, 8, 2, 100, resident_layers=1)
    assert plan.layer_slots == (8, 4, 4, 4) and plan.resident_layers == 1
    assert plan.slot_bytes <= plan.budget_bytes
    # asking for 3 resident layers leaves too little for the last one (20 - 24 < 2): fewer are kept
    plan = plan_slots(Budget(num_bytes=20 * 100), 4, 8, 2, 100, resident_layers=3)
    assert plan.layer_slots == (8, 8, 2, 2) and plan.resident_layers == 2
    # at the minimum nothing can be made resident
    assert plan_slots(Budget(num_bytes=8 * 100), 4, 8, 2, 100, resident_layers=2).layer_slots == (2, 2, 2, 2)


@pytest.mark.parametrize("value, quant", [("int4", Quant.INT4), ("INT4+int2", Quant.INT4_INT2), ("none", Quant.NONE)])
def test_quant_values(value, quant):
    config = OffloadConfig.from_dict({"policy": "lru", "quant": value, "tier": "disk"})
    assert config.quant is quant
    assert OffloadConfig.from_dict(config.to_dict()) == config
    assert OffloadConfig.from_dict({"policy": "lru", "quant": value}).tier is Tier.AUTO  # auto resolves to disk


@pytest.mark.parametrize(
    "value, features",
    [("all", ("groups", "hot", "reorder")), ("none", ()), ("reorder,hot", ("hot", "reorder")),
     (["groups"], ("groups",)), (" Hot , groups ", ("groups", "hot"))],
)
def test_klotski_features_parse_in_canonical_order(value, features):
    config = OffloadConfig.from_dict({"policy": "klotski", "klotski_features": value})
    assert config.klotski_features == features
    assert OffloadConfig.from_dict(config.to_dict()) == config  # survives the trip through additional_config


def test_klotski_switches_default_to_everything_and_survive_other_policies():
    assert OffloadConfig.from_dict({"policy": "klotski"}).klotski_features == ("groups", "hot", "reorder")
    lru = OffloadConfig.from_dict({"policy": "lru"})
    assert "klotski_features" not in lru.to_dict() and OffloadConfig.from_dict(lru.to_dict()) == lru


@pytest.mark.parametrize(
    "raw, message",
    [({"policy": "klotski", "klotski_features": "hot,fast"}, r"unknown \['fast'\]; allowed: 'all', 'none'"),
     ({"policy": "klotski", "klotski_features": 3}, "is not a list of features"),
     ({"policy": "lru", "klotski_features": "none"}, "only apply to policy 'klotski', not 'lru'"),
     ({"policy": "fate", "klotski_max_group": 2}, "only apply to policy 'klotski', not 'fate'"),
     ({"policy": "klotski", "klotski_max_group": 0}, "klotski_max_group 0 is out of range; allowed: 1 to 64")],
)
def test_bad_klotski_switches_name_value_and_allowed(raw, message):
    with pytest.raises(OffloadConfigError, match=message):
        OffloadConfig.from_dict(raw)


@pytest.mark.parametrize("policy", ["lru", "fate", "klotski", "eap"])
def test_replacement_for_every_policy_with_a_cache(policy):
    config = OffloadConfig.from_dict({"policy": policy, "replacement": "Decay"})
    assert config.replacement == "decay"
    assert OffloadConfig.from_dict(config.to_dict()) == config
    assert OffloadConfig.from_dict({"policy": policy}).replacement is None  # the policy's own cache


@pytest.mark.parametrize(
    "raw, message",
    [({"policy": "lru", "replacement": "mru"},
      r"replacement 'mru' is not one of \['lru', 'arc', 'lfru', 'log2decay', 'ewma', 'decay', 'nextuse'\]"),
     ({"policy": "lru", "replacement": "ondemand"}, r"replacement 'ondemand' is not one of"),
     ({"policy": "ondemand", "replacement": "decay"},
      r"replacement only applies to policies with a cache \['lru', 'fate', 'klotski', 'eap'\], not 'ondemand'"),
     ({"replacement": "decay"}, "not 'off'")],
)
def test_bad_replacement_names_value_and_allowed(raw, message):
    with pytest.raises(OffloadConfigError, match=message):
        OffloadConfig.from_dict(raw)
