"""The offloaded MoE layer: an out-of-tree ``RoutedExperts`` that gets its weights from slots.

vLLM's ``RoutedExperts`` owns a layer's expert weights ``w13_weight [E, 2I, H]``
and ``w2_weight [E, H, I]`` and runs the fused-experts kernel on them. This
subclass, registered with ``RoutedExperts.register_oot`` for every model (and,
under their own names, for vLLM's own subclasses: ``layer_classes.py``),

* behaves exactly like the stock class when offload is off;
* when it is on, creates one-expert weights at build time (the loader skips the
  checkpoint's expert tensors, see ``patches/default_loader.py``), and after
  loading is given a slot pool ``[S, ...]`` by the worker (:func:`attach_slots`);
* in ``forward_modular`` remaps ``topk_ids`` to slot ids and calls the stock
  kernel path unchanged. A step that needs more distinct experts than there are
  slots runs in passes split by tokens (a token's experts stay in one pass, so
  results are bit-identical to stock). Within a pass, the tokens whose experts
  are resident compute first, the others in waves as their experts' loads land
  (``integration/passes.py``, where a pass holding every slot also frees some early for the next
  pass's loads), each token still in one kernel call.

The offloaded path runs inside an opaque custom op so that ``torch.compile``
(which vLLM runs with ``fullgraph=True``) neither traces the host-side cache
decisions nor bakes them in.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_moe_offload.core.cache import pack_passes
from vllm_moe_offload.core.link import first_pass
from vllm_moe_offload.core.prefetch_gate import step_kind
from vllm_moe_offload.integration.engine_config import current_offload_config
from vllm_moe_offload.integration import faults
from vllm_moe_offload.integration import policy_inputs
from vllm_moe_offload.integration.cpu_kernel import DIRECT, VIA_VLLM, direct_call
from vllm_moe_offload.integration.passes import PassSchedule, distinct_experts, row_experts
from vllm_moe_offload.integration.quantized_experts import attach_extra_pools, check_layer
from vllm_moe_offload.integration.token_prefetch import PREDICTOR as TOKEN_TABLE
from vllm_moe_offload.runtime.slots import ExpertLoadError, LayerSlots

logger = logging.getLogger("vllm.moe_offload.experts")

#: layer_name -> offloaded layer, so the custom op (which takes only tensors and
#: a string) can find its layer. Filled per worker process.
_LAYERS: dict[str, OffloadRoutedExperts] = {}

#: passes with fewer tokens are not prefills worth trading precision for (a decode batch of
#: requests needs each expert it routes to in full)
_LOW_PRECISION_MIN_TOKENS = 64

#: Fate looks one layer ahead; we look up to this many when loads take longer than a layer's
#: compute. Deeper guesses get worse (recall per distance is in the stats) and their loads
#: queue ahead of nearer ones on the I/O threads, so farther buys little.
MAX_LOOKAHEAD = 3


class OffloadRoutedExperts(PassSchedule, RoutedExperts):
    """``RoutedExperts`` whose expert weights live in a bounded slot pool."""

    def _get_quant_method(self, prefix, quant_config, moe_config):
        quant_method = super()._get_quant_method(prefix, quant_config, moe_config)
        offload = current_offload_config()
        self.offload_enabled = offload is not None and offload.enabled
        self.slots: LayerSlots | None = None
        # fate: every layer predicted from here, nearest first: (distance in layers, layer, its router),
        # set by link_prediction
        self.lookahead: list[tuple[int, OffloadRoutedExperts, torch.nn.Module]] = []
        self.overfetch: int | None = None
        #: fate: load a prediction only where such predictions have paid (``core/prefetch_gate.py``), set by the setup
        self.gate_prefetches = False
        self.compute_s_ema: float | None = None  # this layer's kernel time, smoothed
        self.call_s_min: float | None = None  # this layer's fastest kernel call: what one more call costs
        #: vLLM's CPU kernel called without its fused-MoE machinery, where it runs plainly (``cpu_kernel.py``;
        #: decided at the first call, once the quant method has built its kernel: None until then, False: through
        #: vLLM's machinery)
        self.direct_kernel = None
        #: compute the tokens whose experts are resident while the others load, resident passes first
        #: (off only for klotski's ablation without "reorder")
        self.ready_first = True
        # klotski / profiles: sees every step's routing (integration/observer.py)
        self.observer = None
        #: the next-token table's: told every step's routing (integration/token_prefetch.py), set by the setup
        self.observe_tokens = None
        #: the next offloaded layer, loaded ahead in steps of several tokens (integration/layer_ahead.py), set by
        #: the setup
        self.layer_ahead = None
        #: where this layer's experts lie in the checkpoint (``checkpoint_layout.py``), set with the slots
        self.checkpoint_layout = None
        #: how a quantized layer's experts are held (None: unquantized; quantized_experts.py)
        self.expert_format = None
        #: the quant method's create_weights for one expert, on any module (the holders of quantized loads)
        self.create_one_expert = None
        if not self.offload_enabled:
            return quant_method
        from vllm_moe_offload.integration.layer_classes import refuse_class  # imports this module

        refuse_class(self, prefix, quant_method)  # a vLLM subclass offload cannot take over: before any expert memory exists
        # unquantized or a quantization offload holds (integration/quantized_experts.py); the others are refused
        self.expert_format = check_layer(prefix, quant_method, quant_config, offload)
        if moe_config.has_bias and "w13_bias" not in getattr(self.expert_format, "extra_params", ()):
            raise NotImplementedError(
                f"{prefix}: MoE offload holds expert biases only with gpt-oss's MXFP4 experts; this layer's "
                f"experts have biases and are {self.expert_format.name if self.expert_format else 'unquantized'}"
            )
        original = quant_method.create_weights

        def create_weights(*args, **kwargs):
            # Experts are not materialized at load: one placeholder expert lets
            # vLLM build and post-process the kernel format; the worker swaps in
            # the real slot pool afterwards (attach_slots). The same call makes
            # the one-expert holders a quantized layer's loads fill.
            kwargs["num_experts"] = 1
            self.create_one_expert = functools.partial(
                original, **{k: v for k, v in kwargs.items() if k != "layer"}
            )
            return original(*args, **kwargs)

        quant_method.create_weights = create_weights
        return quant_method

    @property
    def layer_idx(self) -> int:
        return extract_layer_index(self.layer_name)

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        if self.offload_enabled:
            # The loader's expert filter skips these tensors before reading them;
            # anything that still arrives is dropped, never copied into a slot.
            return True if return_success else None
        return super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success)

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        if not self.offload_enabled:
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        if self.slots is None:
            raise RuntimeError(f"{self.layer_name}: offload is on but no slot pool was attached")
        if shared_experts is not None:
            # The kernel would run them inside (when it overlaps them); run them
            # here exactly once instead and keep them out of every pass.
            shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
        if torch.compiler.is_compiling():
            # torch.compile sees one opaque op (vLLM splits its graphs there, ``engine_config.MOE_OP``)
            return torch.ops.vllm_moe_offload.routed_experts(x, topk_weights, topk_ids, self.layer_name)
        # eager: the op's dispatch only leads back here, at about 14 us per call (a decode step's 8 layers: 0.1 ms)
        return self.offloaded_forward(x, topk_weights, topk_ids)

    def offloaded_forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, k], topk_ids [T, k] (expert ids) -> [T, H]."""
        slots = self.slots
        assert slots is not None
        started = time.perf_counter()
        # before any prefetch this layer issues: they queue behind its own loads; the step's kind: the prefetch
        # gate learns what this layer's demand loads stall each kind of step
        slots.begin_layer(step_kind(x.shape[0]))
        if self.observe_tokens is not None:
            self.observe_tokens(topk_ids)
        if self.observer is not None:
            self.observer.on_route(self, topk_ids)
        try:
            return self._offloaded_forward(x, topk_weights, topk_ids)
        finally:
            if self.observer is not None:
                self.observer.on_computed()
            slots.stats.op_s += time.perf_counter() - started

    def _offloaded_forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        slots = self.slots
        assert slots is not None
        # a batch's predictions queue behind its own missing experts' loads (core/prefetch_gate.py's backlog)
        ahead = self.layer_ahead
        if ahead is not None and x.shape[0] >= ahead.min_tokens:
            if slots.identity:  # nothing of its own to load
                ahead.prefetch(x)
            else:  # the next layer's first loads, admitted once this layer's own are (they take slots after them)
                slots.after_own_loads(lambda: ahead.prefetch(x))
            unique = None
        else:  # fate's routers keep the steps the next-layer fill leaves
            unique = distinct_experts(topk_ids) if self.lookahead and x.shape[0] > 1 else None
            if self.lookahead:
                self._prefetch_next(x, slots.missing_load_s(unique) if unique is not None else 0.0)
        if slots.identity:
            # every expert resident in the slot of its own id: nothing to look up or remap
            out = self._kernel(x, topk_weights, topk_ids)
            slots.end_resident_step()
            return out
        failed: dict[int, str] = {}  # expert -> why it could not be loaded
        low = self._least_needed_of_step(topk_ids)  # experts this step may load in low precision
        try:
            if unique is None:
                unique = distinct_experts(topk_ids)
            slots.score_prediction(unique)  # the whole step's needs, before passes split them
            policy_inputs.begin_needs(slots, unique)
            if len(unique) <= slots.num_slots:
                if x.shape[0] == 1 or not self.ready_first or not slots.num_missing(unique):
                    # nothing to compute while loading (or the ablation's plain order)
                    try:
                        slots.ensure(unique, low=low)
                        return self._kernel(x, topk_weights, slots.remap(topk_ids))
                    except ExpertLoadError as err:
                        failed.update(dict.fromkeys(err.experts, str(err)))
                passes = [list(range(x.shape[0]))]
                rows = []
            else:
                rows = row_experts(topk_ids)
                # planned from what is resident or already loading: passes served by resident experts
                # run first (before any load, and before a failing load can evict what they need), and
                # each next pass reuses what the one before left
                missing = slots.missing(unique)
                held = set(unique).difference(missing).union(slots.in_flight(missing)) if self.ready_first else ()
                passes = pack_passes(rows, slots.num_slots, resident=held)
            out = torch.empty_like(x)  # every row is computed, or zeroed by _fail_tokens
            for n, token_idx in enumerate(passes):
                # the next pass's rows: its loads may start in slots this pass is done with
                then = [rows[i] for i in passes[n + 1]] if n + 1 < len(passes) and self.ready_first else []
                self._run_pass(
                    torch.tensor(token_idx, device=x.device), x, topk_weights, topk_ids, out, failed, low, then,
                )
            if failed:
                self._fail_tokens(topk_ids, out, failed)
            return out
        finally:
            slots.end_step()

    def _least_needed_of_step(self, topk_ids: torch.Tensor) -> set[int]:
        """Experts of a prefill step ``topk_ids [T, k]`` that get their int2 copy (``int4+int2`` stores only).

        Fate loads the least-needed experts of a prefill in int2: they touch the
        fewest tokens, so their extra error costs least, and every byte saved
        shortens the prefill's loads. Here: the quarter of the step's distinct
        experts with the fewest tokens (a share of ours; the paper fixes none).
        Steps under ``_LOW_PRECISION_MIN_TOKENS`` tokens never use int2.
        """
        if not self.slots.has_low_precision or topk_ids.shape[0] < _LOW_PRECISION_MIN_TOKENS:
            return set()
        experts, counts = torch.unique(topk_ids, return_counts=True)
        order = counts.argsort(stable=True)[: len(experts) // 4]
        return set(experts[order].tolist())

    def _fail_tokens(self, topk_ids, out, failed: dict[int, str]) -> None:
        """Zero the rows computed without an expert and fail their requests (see ``faults.py``)."""
        gone = torch.tensor(sorted(failed), device=topk_ids.device)
        rows = torch.isin(topk_ids, gone).any(dim=-1).nonzero().flatten()  # [f]
        out[rows] = 0
        reason = next(iter(failed.values()))
        requests = faults.requests_of_rows(rows.tolist())
        if requests is None:  # no request to blame (a dummy run, pipeline parallelism): stop the engine
            raise ExpertLoadError(reason, self.slots.layer_idx, sorted(failed))
        self.slots.stats.failed_tokens += int(rows.numel())
        logger.error(
            "%s: %d tokens need experts %s that could not be loaded; failing requests %s (%s)",
            self.layer_name, rows.numel(), sorted(failed), sorted(requests), reason,
        )
        faults.report(requests, reason)

    def _prefetch_next(self, x: torch.Tensor, backlog_s: float = 0.0) -> None:
        """Fate's cross-layer gate: later layers' routers on this layer's router input.

        The residual stream keeps nearby router inputs close, so layer ``i + d``'s
        experts are predicted ``d`` layers ahead and loaded while the layers in
        between compute. For a batch: the union of every token's top-k, most-needed
        first, filled up to the over-fetch depth by router probability mass. Each
        predicted layer is looked at from as far as its loads need
        (:meth:`_lookahead_depth`); the nearer prediction, made again at the next
        layer, wins. Loads never evict experts the cache deems useful, and with
        ``gate_prefetches`` start only where this layer's earlier predictions of that kind were right often
        enough to pay (``core/prefetch_gate.py``), counting ``backlog_s`` (a batch's own loads, which the
        predictions' loads queue behind) off their lead. In a one-token step, a layer the next-token table has
        predicted for this token (``token_prefetch.py``, layers earlier; loaded or held back by its gate) is
        left to it: the router's guess one layer ahead cost about 0.25 ms per token of router calls and
        bookkeeping on the padded tiny Mixtral at 25%, and 3-5% more loads, to save about 0.15 of 1.4 demand
        misses per token (``scripts/measure/decode_breakdown.py``).
        """
        for distance, nxt, gate in self.lookahead:
            if distance > 1 and distance > self._lookahead_depth(nxt):
                continue
            if x.shape[0] == 1 and nxt.slots.predicted_by(TOKEN_TABLE):
                continue  # the next-token table predicted this token's experts there, layers earlier
            if getattr(nxt.slots.engine, "schedule_prefetches", False):
                # the link schedule decides how many (core/link.py): every candidate, most confident first
                experts, scores = scheduled_prediction(
                    gate(x)[0], nxt.top_k, self._overfetch_depth(nxt, distance), nxt.slots,
                )
                many = x.shape[0] >= _PREFILL_MIN_TOKENS  # a prefill's needs outrank recency
                nxt.slots.prefetch(experts, spare_useful=not many, distance=distance, scores=scores)
                continue
            kind = step_kind(x.shape[0]) if self.gate_prefetches else None
            if not nxt.slots.prediction_wanted(distance, kind, backlog_s):
                continue  # it would not be loaded: skip making it, but for the samples that keep it measured
            experts = predicted_experts(gate(x)[0], nxt.top_k, self._overfetch_depth(nxt, distance),
                                        nxt.slots.num_slots)
            nxt.slots.prefetch(experts, spare_useful=True, distance=distance, gate=kind, backlog_s=backlog_s)

    def _lookahead_depth(self, nxt: OffloadRoutedExperts) -> int:
        """How many layers ahead ``nxt`` is predicted: its loads' time over this layer's compute.

        The loads a prediction needs are the experts it found missing (smoothed)
        times one expert's load time; each layer in between hides one kernel time.
        At least 1; at most how far :func:`link_prediction` linked (farther guesses
        are worse, and their loads queue ahead of nearer ones). 1 until both
        times are measured.
        """
        slots = nxt.slots
        if not slots.load_s_ema or not self.compute_s_ema or slots.prefetch_missing_ema is None:
            return 1
        need_s = slots.prefetch_missing_ema * slots.load_s_ema
        return max(1, math.ceil(need_s / self.compute_s_ema))

    def _overfetch_depth(self, nxt: OffloadRoutedExperts, distance: int = 1) -> int:
        """Fate's k = compute time / one expert's load time, at least top_k (or the configured value).

        A prediction ``distance`` layers ahead has ``distance`` layers' compute to load in.
        """
        if self.overfetch is not None:
            return max(self.overfetch, nxt.top_k)
        load_s = nxt.slots.load_s_ema if nxt.slots is not None else None
        if not load_s or self.compute_s_ema is None:
            return nxt.top_k
        return max(nxt.top_k, int(distance * self.compute_s_ema / load_s))

    def _kernel(self, x, topk_weights, slot_ids) -> torch.Tensor:
        started = time.perf_counter()
        call = self.direct_kernel
        if call is None:
            call = self.direct_kernel = direct_call(self) or False
            self.slots.kernel_path = DIRECT if call else VIA_VLLM
        if call:
            out = call(x, topk_weights, slot_ids)
        else:
            out = super().forward_modular(x, topk_weights, slot_ids, None, None)
        took_s = time.perf_counter() - started
        stats = self.slots.stats
        stats.kernel_s += took_s
        stats.kernel_calls += 1
        self.compute_s_ema = took_s if self.compute_s_ema is None else 0.9 * self.compute_s_ema + 0.1 * took_s
        self.call_s_min = took_s if self.call_s_min is None else min(self.call_s_min, took_s)
        if not isinstance(out, torch.Tensor):
            raise NotImplementedError(
                f"{self.layer_name}: this MoE kernel defers its finalize step, which offload does not support"
            )
        return out


def predicted_experts(logits: torch.Tensor, top_k: int, overfetch: int, limit: int) -> list[int]:
    """Experts to prefetch from a router's ``logits [T, E]``: every token's top-k, the most-needed first
    (then by probability mass), at least ``overfetch`` of them, at most ``limit``."""
    if logits.shape[0] == 1:
        # one token (decode): its top-k come first and the rest by probability, which is the logits' own
        # order; one top-k instead of the batch's half-dozen ops, at every layer of every token
        return logits[0].float().topk(min(max(top_k, overfetch), limit)).indices.tolist()
    logits = logits.float()
    per_token = logits.topk(top_k, dim=-1).indices  # [T, k]
    counts = torch.bincount(per_token.flatten(), minlength=logits.shape[-1])  # [E]
    score = counts * float(logits.shape[0] + 1) + logits.softmax(dim=-1).sum(dim=0)  # counts first
    depth = max(int((counts > 0).sum()), overfetch)
    return score.topk(min(depth, limit)).indices.tolist()


#: a pass of at least this many tokens prefetches its next layer's first pass, sparing no expert the
#: prediction scores lower: a prompt this long needs nearly every expert of a layer (tiny-mixtral, 16
#: experts, top-2: 64 tokens touch 15.2 of them on average), so recency says little about what stays useful
_PREFILL_MIN_TOKENS = 64


def scheduled_prediction(
    logits: torch.Tensor, top_k: int, depth: int, slots: LayerSlots,
) -> tuple[list[int], list[float]]:
    """Prefetch candidates for a scheduled link from a router's ``logits [T, E]``, and every expert's score.

    Decode (fewer than ``_PREFILL_MIN_TOKENS`` tokens): :func:`predicted_experts`
    up to the over-fetch ``depth``, scored as it ranks them (a token's
    probability; for a batch, tokens wanting it first, then probability mass);
    the link schedule admits as many as the link can carry. A prefill: the
    experts of the pass the next layer will run first (:func:`first_pass` on
    the tokens' predicted top-k), most needed first, each scored by the share of
    tokens wanting it, plus 1 in that pass (nothing outside the pass outranks it).
    """
    probs = logits.float().softmax(dim=-1)  # [T, E]
    if logits.shape[0] == 1:
        return predicted_experts(logits, top_k, depth, slots.num_slots), probs[0].tolist()
    rows = probs.topk(top_k, dim=-1).indices  # [T, k]
    counts = torch.bincount(rows.flatten(), minlength=logits.shape[-1]).float()  # [E]
    if logits.shape[0] < _PREFILL_MIN_TOKENS:
        scores = counts * float(logits.shape[0] + 1) + probs.sum(dim=0)  # as predicted_experts ranks them
        return predicted_experts(logits, top_k, depth, slots.num_slots), scores.tolist()
    experts = first_pass(rows.tolist(), slots.num_slots, slots.slot_map.resident())  # resident or loading
    shares = (counts / logits.shape[0]).tolist()
    return experts, [share + (1.0 if e in experts else 0.0) for e, share in enumerate(shares)]


def _routed_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].offloaded_forward(x, topk_weights, topk_ids)


def _routed_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


_LIBRARY = None


def register() -> None:
    """Register the OOT class and the custom op (once per process)."""
    global _LIBRARY
    from vllm.model_executor.custom_op import op_registry_oot

    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("vllm_moe_offload", "FRAGMENT")
        direct_register_custom_op(
            "routed_experts", _routed_experts_op, mutates_args=[], fake_impl=_routed_experts_fake,
            target_lib=_LIBRARY,
        )
    existing = op_registry_oot.get(RoutedExperts.__name__)
    if existing is None:
        RoutedExperts.register_oot(OffloadRoutedExperts)
    elif existing is not OffloadRoutedExperts:
        raise RuntimeError(
            f"another plugin already replaced RoutedExperts with {existing.__qualname__}; "
            "vllm-moe-offload cannot share that hook"
        )


def offloaded_layers(model: torch.nn.Module) -> list[OffloadRoutedExperts]:
    """The model's offloaded MoE layers, in layer order."""
    layers = [m for m in model.modules() if isinstance(m, OffloadRoutedExperts) and m.offload_enabled]
    return sorted(layers, key=lambda m: m.layer_idx)


def link_prediction(
    model: torch.nn.Module, layers: list[OffloadRoutedExperts], overfetch: int | None, io_lanes: int = 1,
) -> int:
    """Give each layer the routers of the offloaded layers up to ``MAX_LOOKAHEAD`` ahead (Fate).

    Returns the layers linked. The router is the ``gate`` module beside the
    experts (``...block_sparse_moe.gate`` for Mixtral, ``...mlp.gate`` for
    Qwen-MoE, OLMoE, DeepSeek). Layers that keep every expert resident need no
    prediction. How far each layer really looks is decided while serving, but
    never beyond ``io_lanes`` (the transfer engine's I/O threads): with one lane,
    loads that outlast compute already keep the link busy, and looking farther
    only adds wrong guesses' bytes (measured on the padded tiny Mixtral, one
    lane, 50%: 4.64 MiB read per token with look-ahead up to 3 against 4.36 with 1).
    """
    max_depth = max(1, min(MAX_LOOKAHEAD, io_lanes))
    links = 0
    for pos, layer in enumerate(layers):
        layer.lookahead = []
        for nxt in layers[pos + 1:]:
            distance = nxt.layer_idx - layer.layer_idx
            if distance > max_depth:
                break
            if nxt.slots is None or nxt.slots.fully_resident:
                continue
            gate_name = nxt.layer_name.rsplit(".experts", 1)[0] + ".gate"
            try:
                gate = model.get_submodule(gate_name)  # called as gate(x) -> (logits [T, E], bias)
            except AttributeError:
                logger.warning("no router found at %s; layer %d is not predicted", gate_name, nxt.layer_idx)
                continue
            layer.lookahead.append((distance, nxt, gate))
        if layer.lookahead:
            layer.overfetch = overfetch
            links += 1
    return links


def attach_slots(layer: OffloadRoutedExperts, slots: LayerSlots) -> None:
    """Replace the placeholder weights with the slot pool and route the op to it."""
    from vllm.model_executor.utils import replace_parameter

    replace_parameter(layer, "w13_weight", slots.w13_slots)
    replace_parameter(layer, "w2_weight", slots.w2_slots)
    if slots.extra_slots:  # a quantized layer's scales
        attach_extra_pools(layer, slots.extra_slots)
    layer.slots = slots
    _LAYERS[layer.layer_name] = layer


# vLLM's model loaders check this mark before handing per-expert tensors over.
OffloadRoutedExperts.weight_loader.supports_moe_loading = True  # type: ignore[attr-defined]
