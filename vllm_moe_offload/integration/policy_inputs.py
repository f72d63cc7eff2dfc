"""What a replacement policy that predicts from the step's context gets from the engine.

``nextuse`` (``core/predictive.NextUsePolicy``) predicts each expert's next use from what followed earlier
occurrences of the step's input token (batch-1 decode) or of the layer's routing. The replay in
``core/simulate.py`` tells it both; in the engine:

* the step's input token: a forward pre-hook on the model reads ``input_ids`` before the layers run and tells
  every such policy (one token: its key; several, as in a prefill or a batch: none, so the policy keys by
  routing);
* the experts the step needs, before the layer's loads (``OffloadRoutedExperts`` calls :func:`begin_needs`),
  which the slot cache pins anyway.

Other policies have neither method and get nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_moe_offload.runtime.slots import LayerSlots


def attach(model: torch.nn.Module, layers: Sequence[LayerSlots]):
    """Install the token hook on ``model`` when a layer's policy wants it; returns the hook's handle or None."""
    policies = [slots.slot_map.policy for slots in layers if hasattr(slots.slot_map.policy, "begin_step_tokens")]
    if not policies:
        return None

    def before_forward(module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # one row: batch-1 decode (the only case with one token to key by); otherwise unknown
        tokens = [int(input_ids.reshape(-1)[0])] if input_ids is not None and input_ids.numel() == 1 else [-1, -1]
        for policy in policies:
            policy.begin_step_tokens(tokens)

    return model.register_forward_pre_hook(before_forward, with_kwargs=True)


def begin_needs(slots: LayerSlots, experts: Sequence[int]) -> None:
    """Tell the layer's policy the experts its step needs, if it wants to know."""
    begin = getattr(slots.slot_map.policy, "begin_pass_needs", None)
    if begin is not None:
        begin(experts)
