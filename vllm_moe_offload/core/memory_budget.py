"""``--moe-offload-budget auto``: the largest expert budget that fits the memory this engine may use.

Arithmetic only. The runtime measures what the engine may still allocate
(``runtime/memory_limit.py``: a cgroup's limit less its use, or the system's
MemAvailable) in each worker once the non-expert weights are loaded, so the
other processes of the engine (API server or ``LLM``'s front end, and the engine
core where the worker has a process of its own) and the weights are
already counted. What is still to come is taken out before the experts get the
rest: the KV cache of every rank, and vLLM's working memory (a step's
activations, allocator slack), for which a safety margin is kept. The budget
is a size budget, so the staging of the loads comes out of it too (``core/plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_offload.core.config import format_bytes

#: vLLM's working memory besides weights, KV cache and slots: a step's activations and logits, the
#: allocator's slack, Python objects of new requests, page cache. A share of what is available, with a
#: floor from what it measured (bench --memory-limit --budgets auto, lru, multiprocess engine, batch-1
#: decode of 32 tokens, a 128- or 512-token prefill, 4 requests at once): the cgroup's peak, page cache
#: included, rose above what was in use when the worker planned plus its slots, staging and KV cache by
#: 132, 237 and 286 MiB in three runs (tiny-pymoe x512, 24 MiB experts, 3.25 GiB limit, 128-token
#: prefill) and 275 MiB (x64, 3 MiB experts, 2.1 GiB limit, 512-token prefill); the worker's own RSS
#: never rose above its plan by more than 3 MiB, so the rest is page cache the kernel can reclaim and
#: the other processes. The floor covers the largest; a step of many more tokens than these needs the share
WORKING_SHARE = 0.10
WORKING_MIN_BYTES = 320 * 2**20
#: with no explicit KV cache size, vLLM's CPU worker gives its KV cache whatever is left of its share of
#: memory (``gpu_memory_utilization``) after the weights, slots included; auto leaves the KV cache this
#: share of that room, the experts the rest (``--kv-cache-memory-bytes`` makes the split explicit).
#: Only where the plugin did not size the KV cache itself (:func:`size_kv_cache`, on the CPU backend)
KV_SHARE_WHEN_UNSET = 0.5
#: the KV cache the plugin sizes (offload on, no size given) holds every sequence at full length, but takes at
#: most this share of what the engine may use: on a box too small for the experts they are the point, and a
#: request that finds no free KV block waits in vLLM's queue; never less than one request of max_model_len
KV_MAX_SHARE = 0.10


@dataclass(frozen=True)
class MemoryView:
    """What this engine may still allocate, and where the figure comes from (said in the startup plan)."""

    available_bytes: int
    source: str
    #: the memory cgroup's usage when its limit is the bound (every process of the engine, page cache aside)
    in_use_bytes: int | None = None


@dataclass(frozen=True)
class AutoBudget:
    """The budget ``auto`` chose, for all tensor-parallel ranks together, and the arithmetic behind it."""

    budget_bytes: int
    available_bytes: int
    kv_bytes: int  # one rank's KV cache
    working_bytes: int
    tp_size: int
    source: str
    kv_note: str
    #: what this worker process held when it planned (the weights loaded, no slot or KV cache yet): with its
    #: peak, what the working margin must cover is measured (README, "Bigger than memory")
    planned_at_bytes: int | None = None
    #: the memory cgroup's usage then (all the engine's processes), when a cgroup limit was the bound
    in_use_bytes: int | None = None

    @property
    def other_processes_bytes(self) -> int | None:
        """What the engine's other processes (vLLM's front end, engine core) held of the limit, if known."""
        if self.in_use_bytes is None or self.planned_at_bytes is None:
            return None
        return max(0, self.in_use_bytes - self.planned_at_bytes)

    def explain(self) -> str:
        ranks = f"{self.tp_size} x " if self.tp_size > 1 else ""
        held = "" if self.planned_at_bytes is None else f"; this worker holds {format_bytes(self.planned_at_bytes)}"
        return (
            f"budget auto = {format_bytes(self.available_bytes)} available ({self.source}{held}) "
            f"- KV cache {ranks}{format_bytes(self.kv_bytes)} ({self.kv_note}) "
            f"- working memory {format_bytes(self.working_bytes)} (safety margin: {WORKING_SHARE:.0%} of what is "
            f"available, at least {format_bytes(WORKING_MIN_BYTES)}) = {format_bytes(self.budget_bytes)}"
        )


def kv_bytes_when_unset(requested_bytes: int, resident_bytes: int) -> int:
    """KV cache auto leaves room for when vLLM sizes it itself: a share of its requested memory not yet used."""
    return int(KV_SHARE_WHEN_UNSET * max(0, requested_bytes - resident_bytes))


def choose_auto_budget(
    view: MemoryView, kv_bytes: int, tp_size: int = 1, kv_note: str = "", planned_at_bytes: int | None = None,
) -> AutoBudget:
    """The largest size budget (all ranks) that leaves every rank's KV cache and the working memory room.

    Never negative: 0 when nothing is left, which the slot plan then refuses
    as below the minimum, with this arithmetic in the message.
    """
    if tp_size < 1 or kv_bytes < 0:
        raise ValueError(f"tp_size {tp_size} and kv_bytes {kv_bytes} must be positive")
    available = max(0, view.available_bytes)
    working = max(WORKING_MIN_BYTES, int(WORKING_SHARE * available))
    budget = max(0, available - tp_size * kv_bytes - working)
    return AutoBudget(budget, available, kv_bytes, working, tp_size, view.source, kv_note, planned_at_bytes,
                      view.in_use_bytes)


@dataclass(frozen=True)
class KvSize:
    """The KV cache the plugin gives an engine whose user set no size, and why (said in the startup plan)."""

    kv_bytes: int  # one rank's KV cache
    why: str


def size_kv_cache(
    bytes_per_token: int, block_tokens: int, max_model_len: int, max_num_seqs: int, view: MemoryView,
) -> KvSize:
    """Room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, at most ``KV_MAX_SHARE`` of ``view``.

    ``bytes_per_token``: one token's keys and values in every attention layer
    of one rank. vLLM hands out whole blocks of ``block_tokens`` tokens, so a
    sequence takes its length rounded up to blocks, and its block pool holds one
    block back for good (its null block). Never below one sequence and that
    block: vLLM refuses to start with a KV cache that cannot hold one request of
    ``max_model_len`` besides it ("No available memory for the cache blocks").
    """
    if min(bytes_per_token, block_tokens, max_model_len, max_num_seqs) < 1:
        raise ValueError(
            f"bad KV geometry: {bytes_per_token} bytes per token, blocks of {block_tokens} tokens, "
            f"max_model_len {max_model_len}, max_num_seqs {max_num_seqs}"
        )
    block = block_tokens * bytes_per_token
    per_sequence = -(-max_model_len // block_tokens) * block
    one = per_sequence + block  # and vLLM's null block
    every = per_sequence * max_num_seqs + block
    cap = int(KV_MAX_SHARE * max(0, view.available_bytes))
    kv_bytes = max(one, min(every, cap))
    full = (f"max_num_seqs {max_num_seqs} x max_model_len {max_model_len} x {format_bytes(bytes_per_token)} per token"
            f", and the block vLLM holds back")
    if kv_bytes == every:
        why = f"sized by the plugin: {full}"
    elif kv_bytes == one:
        why = (f"sized by the plugin: one request of max_model_len {max_model_len} x {format_bytes(bytes_per_token)} "
               f"per token and the block vLLM holds back (the least vLLM starts with; {full} would be "
               f"{format_bytes(every)})")
    else:
        why = (f"sized by the plugin: {KV_MAX_SHARE:.0%} of {format_bytes(view.available_bytes)} available "
               f"({view.source}), for {(kv_bytes - block) // per_sequence} of max_num_seqs {max_num_seqs} "
               f"full-length requests ({full} would be {format_bytes(every)})")
    return KvSize(kv_bytes, why + "; --kv-cache-memory-bytes sets it")
