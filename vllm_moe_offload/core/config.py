"""The one configuration object of the plugin, parsed and validated once.

It comes from ``additional_config["moe_offload"]`` (a plain dict, which is how
vLLM carries it to every process) and is frozen afterwards. Unknown keys and
out-of-range values raise :class:`OffloadConfigError` naming the value and what
is allowed.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_moe_offload.core.replacement import REPLACEMENT_NAMES

#: key under ``additional_config`` that holds the plugin's settings
CONFIG_KEY = "moe_offload"


class OffloadConfigError(ValueError):
    """A bad ``moe_offload`` setting: says what was wrong and what is allowed."""


class Policy(str, enum.Enum):
    OFF = "off"
    ONDEMAND = "ondemand"
    LRU = "lru"
    FATE = "fate"
    KLOTSKI = "klotski"
    #: the MoE-Infinity-style baseline: activation-path matching per request, LRU cache
    EAP = "eap"


#: Klotski's parts that can be switched off one by one, to reproduce the paper's ablation
#: (``klotski_features``): ``groups`` lets a step take up to ``klotski_max_group`` times the
#: token budget so each expert load serves more tokens (multi-batch); ``hot`` prefetches only
#: the next layer's hot experts from the correlation table (without it: the whole next layer,
#: as many experts as fit); ``reorder`` computes the tokens whose experts are resident first and
#: the others in waves as their experts' loads land, passes served by resident experts first
#: (expert-aware order).
KLOTSKI_FEATURES: tuple[str, ...] = ("groups", "hot", "reorder")

#: policies described in DESIGN.md that later releases add; refused clearly today
PLANNED_POLICIES: tuple[str, ...] = ()


class Tier(str, enum.Enum):
    """Where experts that are not in a slot live."""

    AUTO = "auto"  # disk on the CPU backend, pinned host memory on CUDA
    DISK = "disk"  # the checkpoint's safetensors, read with direct I/O
    HOST = "host"  # a host-memory copy of every expert (pinned on CUDA)


class Quant(str, enum.Enum):
    """How offloaded experts are stored (see runtime/expert_store.py)."""

    NONE = "none"  # full precision: the checkpoint's own safetensors
    INT4 = "int4"  # int4, groups of 64, in a store written once under the cache directory
    INT4_INT2 = "int4+int2"  # both int4 and int2 (groups of 32) of every expert; int2 on request


class Pool(str, enum.Enum):
    """How the budget's slots are split between the MoE layers."""

    AUTO = "auto"  # shared where it applies (full-precision experts on the CPU backend), else layer
    LAYER = "layer"  # a pool per layer, each its share of the budget (what the papers do)
    SHARED = "shared"  # one pool: the layer that runs takes slots from the others (``core/shared_pool.py``)


class Store(str, enum.Enum):
    """Where the disk tier reads full-precision experts from."""

    CHECKPOINT = "checkpoint"  # the checkpoint's safetensors; every load converts to the kernel layout
    KERNEL = "kernel"  # a copy in the kernel layout, written once under the cache directory; loads only read
    PACKED = "packed"  # the kernel copy coded losslessly (about 0.75 of the bytes); loads read and decode


_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_PCT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """Fast-memory budget for expert slots: bytes, a share of all expert bytes, or ``auto``.

    ``auto`` is the largest size that fits the memory this engine may use, chosen
    in each worker once the non-expert weights are loaded (``core/memory_budget.py``);
    it must be resolved to a size before :meth:`resolve`.
    """

    num_bytes: int | None = None
    fraction: float | None = None
    auto: bool = False

    @classmethod
    def parse(cls, value: Any) -> Budget:
        """Parse ``auto``, ``4GiB``, ``512MiB``, ``1.5GB``, ``123456`` (bytes) or ``50%``."""
        allowed = "auto, a size such as 4GiB, 512MiB, 1.5GB or 1048576 (bytes), or a share such as 50%"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return cls(auto=True)
        if isinstance(value, bool):
            raise OffloadConfigError(f"budget {value!r} is not a size; allowed: {allowed}")
        if isinstance(value, (int, float)):
            if value <= 0:
                raise OffloadConfigError(f"budget {value!r} must be positive; allowed: {allowed}")
            return cls(num_bytes=int(value))
        if not isinstance(value, str):
            raise OffloadConfigError(f"budget {value!r} is not a size; allowed: {allowed}")
        if m := _PCT_RE.match(value):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise OffloadConfigError(f"budget {value!r} must be in (0%, 100%]; allowed: {allowed}")
            return cls(fraction=pct / 100.0)
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS | {"": 1}:
            raise OffloadConfigError(f"budget {value!r} is malformed; allowed: {allowed}")
        num = float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)
        if num < 1:
            raise OffloadConfigError(f"budget {value!r} must be positive; allowed: {allowed}")
        return cls(num_bytes=int(num))

    def resolve(self, total_bytes: int) -> int:
        """Bytes granted, given the model's total expert bytes."""
        if self.auto:
            raise ValueError("budget auto is chosen from the memory the engine may use: resolve it first")
        if self.fraction is not None:
            return int(self.fraction * total_bytes)
        assert self.num_bytes is not None
        return self.num_bytes

    def __str__(self) -> str:
        if self.auto:
            return "auto"
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_bytes(self.num_bytes or 0)


def format_bytes(num: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num >= size:
            return f"{num / size:.2f} {unit}"
    return f"{num} B"


@dataclass(frozen=True)
class OffloadConfig:
    """Validated settings of the plugin (see ``--help=MoEOffload``)."""

    policy: Policy = Policy.OFF
    #: ``auto`` by default: the largest budget the engine's memory leaves the experts (core/memory_budget.py)
    budget: Budget = Budget(auto=True)
    tier: Tier = Tier.AUTO
    direct_io: bool = True
    io_threads: int = 1
    link_gbps: float | None = None
    link_latency_ms: float = 0.0
    quant: Quant = Quant.NONE
    #: full precision on disk: the checkpoint itself, or a store in the kernel's layout (no conversion per load)
    store: Store = Store.CHECKPOINT
    cache_dir: str | None = None
    #: a saved activation profile (correlation table) that warms the cache and the predictor at start
    profile: str | None = None
    #: write the activation profile seen while serving here at shutdown
    save_profile: str | None = None
    #: fate: leading MoE layers kept fully resident (None: automatic)
    resident_layers: int | None = None
    #: fate: experts prefetched per layer at least (None: measured compute/transfer ratio)
    overfetch: int | None = None
    #: schedule the link (``core/link.py``): demand loads before prefetches, a prefetch only while the
    #: link would otherwise idle before its layer runs, and a prefill's next layer loaded ahead. Off: every
    #: load in the order issued and Fate's over-fetch depth. Off by default until a bench shows it pays:
    #: on a loaded machine (docs/bench/link) it read 0-7 more experts than off per 64-token decode and 3-6
    #: more per prefill, and its tok/s could not be told from off
    link_schedule: bool = False
    #: fate and klotski: load a prediction's missing experts only where such predictions (this layer's, at
    #: that distance, for one token's step or a batch's) have been right often enough to pay for the load a
    #: wrong one wastes (``core/prefetch_gate.py``); off: every prediction is loaded, as the papers do
    prefetch_gate: bool = True
    #: batch-1 decode: before the step's layers run, load the experts each layer sent the step's input token
    #: to the last time it saw it (``core/token_routes.py``, ``integration/token_prefetch.py``), through the
    #: prefetch gate like the routers' predictions; None (default): on for fate, off for the others
    token_prefetch: bool | None = None
    #: steps of several tokens: each layer loads, behind its own misses, the next layer's first missing experts
    #: (that layer's router on this layer's input) while the link would otherwise idle
    #: (``integration/layer_ahead.py``); None (default): on for every policy but ``ondemand``
    layer_ahead: bool | None = None
    #: longest a forward pass waits for one expert load; past it the tokens that need the
    #: expert fail (their requests end with an error) and the load finishes in the background
    load_timeout_s: float = 30.0
    #: an I/O thread busy longer than this on one load is declared stuck: the engine stops
    #: with an error instead of hanging behind it (must exceed load_timeout_s)
    io_stuck_s: float = 120.0
    #: the slot caches' replacement policy (``core/cache.py``, ``core/frequency.py``); None: the
    #: offload policy's own (ARC for fate, LRU for the others). ``ondemand`` has no cache to replace in
    replacement: str | None = None
    #: ``layer``: each MoE layer its own share of the slots; ``shared``: one pool for every offloaded layer,
    #: evicting by expected next use over the whole model (``core/shared_pool.py``); ``auto`` (default):
    #: shared for full-precision experts on the CPU backend, where the bench measured it faster in every
    #: cell (``docs/bench/shared-pool/``), layer elsewhere (quantized kernels and CUDA: not measured yet;
    #: ``ondemand``; and when ``replacement`` is given, since it evicts within a layer's pool)
    pool: Pool = Pool.AUTO
    #: klotski: which of its parts run (see KLOTSKI_FEATURES); all by default, none for the
    #: ablation's first row (whole next layer prefetched, no grouping, no reordering)
    klotski_features: tuple[str, ...] = KLOTSKI_FEATURES
    #: klotski with ``groups``: a step may schedule up to this many times the engine's token budget
    klotski_max_group: int = 4
    #: klotski with ``groups``: while loads dominate, a decode-only step with nothing waiting is held
    #: up to this long (and never longer than one step's planned loads) so that arriving requests join it.
    #: Off by default: with no arrival a hold only delays the step (batch-1 decode at 25% takes ~35 ms a
    #: token here, so 5 ms of hold per token would cost about 14%)
    klotski_hold_ms: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.policy is not Policy.OFF

    @property
    def token_prefetch_on(self) -> bool:
        """Whether batch-1 decode steps load what the next-token table predicts (``token_prefetch``)."""
        return self.token_prefetch if self.token_prefetch is not None else self.policy is Policy.FATE

    @property
    def layer_ahead_on(self) -> bool:
        """Whether steps of several tokens load the next layer's first experts ahead (``layer_ahead``)."""
        if self.layer_ahead is not None:
            return self.layer_ahead
        return self.policy not in (Policy.OFF, Policy.ONDEMAND)

    @property
    def kernel_store(self) -> bool:
        """Loads read full-precision experts from the kernel-layout store: ready for the kernel, no conversion."""
        return self.store in (Store.KERNEL, Store.PACKED) and self.quant is Quant.NONE

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> OffloadConfig:
        """Validate a ``moe_offload`` dict; ``None`` or ``{}`` means off."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise OffloadConfigError(f"moe_offload must be a dict, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise OffloadConfigError(
                f"unknown moe_offload key(s) {unknown}; allowed keys: {sorted(known)}"
            )
        kw: dict[str, Any] = {}
        raw = {k: v for k, v in raw.items() if v is not None}
        if "policy" in raw:
            kw["policy"] = _parse_policy(raw["policy"])
        if "budget" in raw:
            kw["budget"] = raw["budget"] if isinstance(raw["budget"], Budget) else Budget.parse(raw["budget"])
        if "tier" in raw:
            kw["tier"] = _enum(Tier, raw["tier"], "tier")
        if "quant" in raw:
            kw["quant"] = _parse_quant(raw["quant"])
        if "store" in raw:
            kw["store"] = _enum(Store, raw["store"], "store")
        if "pool" in raw:
            kw["pool"] = _enum(Pool, raw["pool"], "pool")
            if kw["pool"] is Pool.SHARED and kw.get("policy") is Policy.ONDEMAND:
                raise OffloadConfigError(
                    "pool 'shared' needs a policy with a cache to replace in (lru, fate, klotski, eap), "
                    "not 'ondemand', whose scratch slots are emptied every step"
                )
        if "direct_io" in raw:
            if not isinstance(raw["direct_io"], bool):
                raise OffloadConfigError(f"direct_io {raw['direct_io']!r} must be true or false")
            kw["direct_io"] = raw["direct_io"]
        if "link_schedule" in raw:
            kw["link_schedule"] = _switch(raw["link_schedule"], "link_schedule")
        if "prefetch_gate" in raw:
            kw["prefetch_gate"] = _switch(raw["prefetch_gate"], "prefetch_gate")
        for key in ("token_prefetch", "layer_ahead"):  # loads ahead: into a cache, which ondemand does not keep
            if key in raw:
                kw[key] = _switch(raw[key], key)
                if kw[key] and kw.get("policy") is Policy.ONDEMAND:
                    raise OffloadConfigError(
                        f"{key} needs a policy with a cache to load into ahead (lru, fate, klotski, eap), "
                        "not 'ondemand', whose scratch slots are emptied every step"
                    )
        if "io_threads" in raw:
            kw["io_threads"] = _number(raw["io_threads"], "io_threads", int, 1, 64)
        if "link_gbps" in raw:
            kw["link_gbps"] = _number(raw["link_gbps"], "link_gbps", float, 1e-3, 1e4)
        if "link_latency_ms" in raw:
            kw["link_latency_ms"] = _number(raw["link_latency_ms"], "link_latency_ms", float, 0.0, 1e4)
        if "resident_layers" in raw:
            kw["resident_layers"] = _number(raw["resident_layers"], "resident_layers", int, 0, 4096)
        if "overfetch" in raw:
            kw["overfetch"] = _number(raw["overfetch"], "overfetch", int, 1, 4096)
        if "load_timeout_s" in raw:
            kw["load_timeout_s"] = _number(raw["load_timeout_s"], "load_timeout_s", float, 1e-3, 3600.0)
        if "io_stuck_s" in raw:
            kw["io_stuck_s"] = _number(raw["io_stuck_s"], "io_stuck_s", float, 1e-3, 86400.0)
        if "klotski_features" in raw:
            kw["klotski_features"] = _parse_features(raw["klotski_features"])
        if "klotski_max_group" in raw:
            kw["klotski_max_group"] = _number(raw["klotski_max_group"], "klotski_max_group", int, 1, 64)
        if "klotski_hold_ms" in raw:
            kw["klotski_hold_ms"] = _number(raw["klotski_hold_ms"], "klotski_hold_ms", float, 0.0, 1000.0)
        _check_klotski(kw, raw)
        if "replacement" in raw:
            kw["replacement"] = _parse_replacement(raw["replacement"], kw.get("policy", Policy.OFF))
        timeout_s = kw.get("load_timeout_s", cls.load_timeout_s)
        if kw.get("io_stuck_s", cls.io_stuck_s) <= timeout_s:
            raise OffloadConfigError(
                f"io_stuck_s {kw.get('io_stuck_s', cls.io_stuck_s)!r} must exceed load_timeout_s {timeout_s!r}: "
                "a load is declared stuck only after the forward pass stopped waiting for it"
            )
        for key in ("cache_dir", "profile", "save_profile"):
            if key in raw:
                if not isinstance(raw[key], str) or not raw[key]:
                    raise OffloadConfigError(f"{key} {raw[key]!r} must be a non-empty path")
                kw[key] = raw[key]
        _check_quant(kw)
        if "profile" in kw and not os.path.isfile(kw["profile"]):
            raise OffloadConfigError(
                f"profile {kw['profile']!r} is not a file; give a profile written by "
                "`vllm-moe-offload simulate TRACE --save-profile PATH` or by save_profile"
            )
        if "save_profile" in kw and not os.path.isdir(os.path.dirname(os.path.abspath(kw["save_profile"]))):
            raise OffloadConfigError(f"save_profile {kw['save_profile']!r}: its directory does not exist")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (vLLM hashes ``additional_config``)."""
        out = asdict(self)
        out["policy"] = self.policy.value
        out["budget"] = self.budget.num_bytes if self.budget.num_bytes is not None else str(self.budget)
        out["tier"] = self.tier.value
        out["quant"] = self.quant.value
        out["store"] = self.store.value
        out["pool"] = self.pool.value
        if self.policy is Policy.KLOTSKI:
            out["klotski_features"] = ",".join(self.klotski_features) or "none"
        else:  # they only apply to klotski, and from_dict refuses them elsewhere
            del out["klotski_features"], out["klotski_max_group"], out["klotski_hold_ms"]
        return out


def _enum(kind: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = [m.value for m in kind]
        raise OffloadConfigError(f"{key} {value!r} is not one of {allowed}") from None


def _parse_policy(value: Any) -> Policy:
    if str(value).lower() in PLANNED_POLICIES:
        raise OffloadConfigError(
            f"policy {value!r} is planned but not in this release; "
            f"allowed: {[p.value for p in Policy]}"
        )
    return _enum(Policy, value, "policy")


def _parse_replacement(value: Any, policy: Policy) -> str:
    """A replacement policy's name, for an offload policy that has a cache to replace in."""
    name = str(value).strip().lower()
    if name not in REPLACEMENT_NAMES:
        raise OffloadConfigError(f"replacement {value!r} is not one of {list(REPLACEMENT_NAMES)}")
    if policy in (Policy.OFF, Policy.ONDEMAND):
        with_cache = [p.value for p in Policy if p not in (Policy.OFF, Policy.ONDEMAND)]
        raise OffloadConfigError(
            f"replacement only applies to policies with a cache {with_cache}, not {policy.value!r}"
        )
    return name


def _parse_quant(value: Any) -> Quant:
    return _enum(Quant, value, "quant")


def _parse_features(value: Any) -> tuple[str, ...]:
    """``"all"``, ``"none"``, ``"groups,hot"`` or a list of names -> the features, in canonical order."""
    allowed = f"'all', 'none' or a comma-separated subset of {list(KLOTSKI_FEATURES)}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return KLOTSKI_FEATURES
        names = [] if text == "none" else [n.strip() for n in text.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [str(n).strip().lower() for n in value]
    else:
        raise OffloadConfigError(f"klotski_features {value!r} is not a list of features; allowed: {allowed}")
    unknown = [n for n in names if n not in KLOTSKI_FEATURES]
    if unknown:
        raise OffloadConfigError(f"klotski_features {value!r}: unknown {unknown}; allowed: {allowed}")
    return tuple(f for f in KLOTSKI_FEATURES if f in names)


def _check_klotski(kw: dict[str, Any], raw: dict[str, Any]) -> None:
    """Klotski's switches mean nothing to another policy: refuse them rather than ignore them."""
    given = [key for key in ("klotski_features", "klotski_max_group", "klotski_hold_ms") if key in raw]
    if given and kw.get("policy") is not Policy.KLOTSKI:
        policy = kw.get("policy", Policy.OFF).value
        raise OffloadConfigError(f"{', '.join(given)} only apply to policy 'klotski', not {policy!r}")


def _check_quant(kw: dict[str, Any]) -> None:
    """The quantized and kernel stores are disk tiers of their own: a host-memory copy of dequantized
    experts would cost full-precision memory and keep only the error, and the host tier already holds
    every expert converted, so ``tier host`` contradicts both; a kernel store is full precision."""
    quant, store = kw.get("quant", Quant.NONE), kw.get("store", Store.CHECKPOINT)
    if quant is not Quant.NONE and kw.get("tier") is Tier.HOST:
        raise OffloadConfigError(
            f"quant {quant.value!r} contradicts tier 'host': quantized experts are read from their "
            "store on disk; use tier 'disk' or 'auto' with quant, or quant 'none' with tier 'host'"
        )
    if store is not Store.CHECKPOINT and quant is not Quant.NONE:
        raise OffloadConfigError(
            f"store {store.value!r} holds full-precision experts and quant {quant.value!r} reads its own int4 "
            f"store; use one of them: store {store.value!r} with quant 'none', or quant with store 'checkpoint'"
        )
    if store is not Store.CHECKPOINT and kw.get("tier") is Tier.HOST:
        raise OffloadConfigError(
            f"store {store.value!r} contradicts tier 'host': the host tier converts every expert once into memory "
            f"and reads no store; use tier 'disk' or 'auto' with store {store.value!r}"
        )


def _switch(value: Any, key: str) -> bool:
    """A boolean setting: true/false, or its text (``on``/``off`` too: bench policy entries are text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise OffloadConfigError(f"{key} {value!r} must be true or false (or on/off)")


def _number(value: Any, key: str, kind: type, low: float, high: float) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        num = kind(value)
        if kind is int and num != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise OffloadConfigError(f"{key} {value!r} is not a {kind.__name__}") from None
    if not low <= num <= high:
        raise OffloadConfigError(f"{key} {value!r} is out of range; allowed: {low} to {high}")
    return num
