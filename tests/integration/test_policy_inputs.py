"""``integration/policy_inputs``: a policy that keys by the step's token gets it from the model's forward."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_moe_offload.core.predictive import NextUsePolicy
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.integration import policy_inputs


class _Model(torch.nn.Module):
    def forward(self, input_ids, positions):
        return input_ids


def _slots(policy):
    return SimpleNamespace(slot_map=SimpleNamespace(policy=policy))


def test_one_token_steps_give_the_token_and_others_none():
    nextuse = make_policy("nextuse", 8, 4, 2)
    assert isinstance(nextuse, NextUsePolicy)
    model = _Model()
    handle = policy_inputs.attach(model, [_slots(nextuse), _slots(make_policy("lru", 8, 4, 2))])
    assert handle is not None
    model(input_ids=torch.tensor([42]), positions=torch.tensor([7]))
    assert nextuse._token == 42
    model(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))  # a prefill: no single token
    assert nextuse._token is None
    handle.remove()


def test_no_hook_without_such_a_policy():
    assert policy_inputs.attach(_Model(), [_slots(make_policy("lru", 8, 4, 2))]) is None


def test_needs_reach_only_policies_that_take_them():
    nextuse = make_policy("nextuse", 8, 4, 2)
    policy_inputs.begin_needs(_slots(nextuse), [1, 5])
    assert nextuse._needs == {1, 5}
    policy_inputs.begin_needs(_slots(make_policy("lru", 8, 4, 2)), [1, 5])  # nothing to tell: no error
