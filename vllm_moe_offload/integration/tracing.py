"""Recording which experts a running vLLM model routes every token to.

Worker side of ``vllm-moe-offload trace``. A :class:`RoutingRecorder` attached
to a worker's model keeps, for every forward pass (one engine step), the rows'
request ids, positions and token ids, and for every MoE layer the router's
``topk_ids`` and ``topk_weights`` (and optionally the router's input). Nothing
it does changes what the model computes.

How it hooks in, without touching the offloaded layer or vLLM's code:

* the step's layout comes from a forward pre-hook on the model (``input_ids``
  and ``positions``) and the model runner's persistent batch (request ids in
  batch order, ``query_start_loc`` splitting the flat token rows per request);
  rows past the scheduled tokens (padding) are dropped;
* the routing comes from each MoE layer's router: vLLM's own capture hook
  (``set_capture_fn``) only hands over ``topk_ids``, so the recorder wraps the
  ``select_experts`` method of each router *instance* (not the class) and
  records its arguments and results. :meth:`RoutingRecorder.remove` restores
  the instances.

The wrapper sees real values only when the model runs eagerly: under
``torch.compile`` Python side effects are traced away, so :func:`install`
refuses a compiled model. The functions below take the worker as first
argument so that ``LLM.collective_rpc(install, kwargs=...)`` can run them in
the worker (in-process engines run them directly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm.moe_offload.tracing")

#: the recorder of this worker process (one model per worker)
_RECORDER: RoutingRecorder | None = None


@dataclass
class StepRecord:
    """One forward pass: ``T`` token rows over ``L`` MoE layers (numpy, host)."""

    req_ids: list[str]  # request id of each row's request, by request index
    row_req: np.ndarray  # [T] int32, index into req_ids
    positions: np.ndarray  # [T] int32
    token_ids: np.ndarray  # [T] int32
    topk_ids: np.ndarray  # [T, L, k] int32
    topk_weights: np.ndarray  # [T, L, k] float32
    hidden: np.ndarray | None = None  # [T, L, H] float16


@dataclass
class _Pending:
    """The step being recorded: layout from the pre-hook, routing per layer."""

    req_ids: list[str]
    row_req: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


class RoutingRecorder:
    """Records the routing of every forward pass of one model (see module docstring)."""

    def __init__(self, model: torch.nn.Module, runner: Any, hidden: bool, hidden_size: int) -> None:
        self.model = model
        self.runner = runner
        self.record_hidden = hidden
        self.hidden_size = hidden_size
        self.steps: list[StepRecord] = []
        self.layer_ids: list[int] = []
        self.num_experts = 0
        self.top_k = 0
        self._pending: _Pending | None = None
        self._restore: list[Callable[[], None]] = []

    def install(self) -> None:
        """Wrap every MoE layer's router and hook the model's forward."""
        from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
        from vllm.model_executor.models.utils import extract_layer_index

        routers = []
        for name, module in self.model.named_modules():
            router = getattr(module, "router", None)
            if isinstance(router, FusedMoERouter):
                layer_name = getattr(module, "layer_name", name)
                routers.append((extract_layer_index(layer_name), router))
        if not routers:
            raise RuntimeError(f"{type(self.model).__name__} has no MoE router to trace")
        routers.sort(key=lambda item: item[0])
        self.layer_ids = [layer_idx for layer_idx, _ in routers]
        self.num_experts = int(routers[0][1].global_num_experts)
        self.top_k = int(routers[0][1].top_k)
        for layer_idx, router in routers:
            self._wrap_router(layer_idx, router)
        pre = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        post = self.model.register_forward_hook(self._after_forward)
        self._restore += [pre.remove, post.remove]
        logger.info("tracing the routing of %d MoE layers %s", len(routers), self.layer_ids)

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def _wrap_router(self, layer_idx: int, router: Any) -> None:
        original = router.select_experts  # the bound method of this instance

        def select_experts(hidden_states, router_logits, *args, **kwargs):
            topk_weights, topk_ids = original(hidden_states, router_logits, *args, **kwargs)
            if self._pending is not None:
                hidden = hidden_states[:, : self.hidden_size] if self.record_hidden else None
                self._pending.layers[layer_idx] = (topk_ids, topk_weights, hidden)
            return topk_weights, topk_ids

        router.select_experts = select_experts  # instance attribute shadows the class method
        self._restore.append(lambda: delattr(router, "select_experts"))

    def _before_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None:
            raise RuntimeError("the model's forward got no positions; cannot lay out the step")
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        starts = np.asarray(self.runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64)  # [R+1]
        num_rows = int(starts[-1])
        row_req = np.repeat(np.arange(num_reqs, dtype=np.int32), np.diff(starts))  # [T]
        token_ids = (
            input_ids[:num_rows].cpu().numpy().astype(np.int32)
            if input_ids is not None else np.full(num_rows, -1, dtype=np.int32)
        )
        self._pending = _Pending(
            req_ids=list(batch.req_ids[:num_reqs]),
            row_req=row_req,
            positions=positions[:num_rows].cpu().numpy().astype(np.int32),
            token_ids=token_ids,
        )

    def _after_forward(self, module, args, output) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not len(pending.row_req):
            return
        missing = [i for i in self.layer_ids if i not in pending.layers]
        if missing:
            raise RuntimeError(
                f"MoE layers {missing} ran without their router's select_experts (a monolithic kernel "
                "routes inside the kernel); this model cannot be traced"
            )
        num_rows = len(pending.row_req)
        per_layer = [pending.layers[i] for i in self.layer_ids]
        self.steps.append(
            StepRecord(
                req_ids=pending.req_ids,
                row_req=pending.row_req,
                positions=pending.positions,
                token_ids=pending.token_ids,
                topk_ids=_stack([ids[:num_rows] for ids, _, _ in per_layer], torch.int32),
                topk_weights=_stack([w[:num_rows] for _, w, _ in per_layer], torch.float32),
                hidden=(
                    _stack([h[:num_rows] for _, _, h in per_layer], torch.float16)
                    if self.record_hidden else None
                ),
            )
        )


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """L tensors [T, ...] -> numpy [T, L, ...]."""
    return torch.stack([t.detach().to("cpu", dtype) for t in tensors], dim=1).numpy()


def install(worker: Any, hidden: bool = False) -> dict:
    """Attach a recorder to ``worker``'s model.

    Returns the geometry a trace's metadata needs: ``layer_ids``,
    ``num_experts``, ``top_k``, ``hidden_size`` and ``expert_bytes`` (None when
    the config does not tell).
    """
    global _RECORDER
    from vllm.config import CompilationMode

    from vllm_moe_offload.integration.engine_config import estimate_geometry

    vllm_config = worker.vllm_config
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise RuntimeError("routing is traced in eager mode only: start the engine with enforce_eager=True")
    if _RECORDER is not None:
        _RECORDER.remove()
    model_config = vllm_config.model_config
    hf_config = model_config.hf_text_config
    runner = worker.model_runner
    _RECORDER = RoutingRecorder(runner.get_model(), runner, hidden, int(hf_config.hidden_size))
    _RECORDER.install()
    geometry = estimate_geometry(hf_config, model_config.dtype.itemsize) or {}
    return {
        "layer_ids": list(_RECORDER.layer_ids),
        "num_experts": _RECORDER.num_experts,
        "top_k": _RECORDER.top_k,
        "hidden_size": _RECORDER.hidden_size,
        "expert_bytes": _expert_bytes(runner.get_model()) or geometry.get("expert_bytes"),
    }


def _expert_bytes(model: torch.nn.Module) -> int | None:
    """One expert's bytes as the first MoE layer holds quantized experts: every per-expert tensor (weights,
    scales, zero points) in its own dtype; None for unquantized experts (the model dtype's size is theirs)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    layer = next((m for m in model.modules() if isinstance(m, RoutedExperts)), None)
    if layer is None or isinstance(layer.quant_method, UnquantizedFusedMoEMethod):
        return None
    rows = layer.w13_weight.shape[0]  # experts (slots when offloaded); aliases are listed once
    return sum(p[0].nbytes for p in layer.parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == rows)


def drain(worker: Any) -> list[StepRecord]:
    """The steps recorded since the last drain (and forget them)."""
    if _RECORDER is None:
        raise RuntimeError("no routing recorder is installed in this worker")
    steps, _RECORDER.steps = _RECORDER.steps, []
    return steps


def uninstall(worker: Any) -> None:
    global _RECORDER
    if _RECORDER is not None:
        _RECORDER.remove()
        _RECORDER = None
