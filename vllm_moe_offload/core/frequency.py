"""Frequency-based replacement policies: peers' ideas, and the one we measured best.

Every policy here scores each resident expert and evicts the unpinned one with
the lowest score; ties go to the least recently accessed, then to the lowest id.
Time is counted in steps (:meth:`ReplacementPolicy.on_step_end`: one forward of
the layer, one token per sequence in decode), so a half-life is a number of
tokens whatever the model's ``top_k``.

Edge cases, as part of every policy's contract:

* a resident expert never accessed (warm-loaded) leaves before any accessed one
  (it scores lowest, or ties and is the least recent), the lowest id first;
* pinned experts are never chosen (the caller guarantees one unpinned resident);
* ``lfru`` forgets an expert's count when it leaves; ``log2decay``, ``ewma``
  and ``decay`` keep it (a re-entering expert starts from its history);
* a prefetch is an access like any other (``SlotMap.touch`` reports it).

Replays of ``shared/traces`` at 25% and 50% of the experts (``vllm-moe-offload
simulate TRACE --policies all``): ``decay`` has the best demand hit rate on every
trace and budget (Mixtral humaneval at 50%: 0.620; ewma 0.618, log2decay 0.613,
lfru 0.610, LRU 0.599; Qwen1.5-MoE at 50%: 0.612 against LRU's 0.568), and none
comes near Belady (0.746, 0.813). ``tests/core/test_replacement_traces.py`` checks
these, and shows why no policy that sees only the past reaches issue 17's 0.675.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Collection

from vllm_moe_offload.core.cache import ReplacementPolicy


class ScoredPolicy(ReplacementPolicy):
    """Evicts the lowest :meth:`score`; keeps the step clock and the access order."""

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self.step = 0  # steps ended so far
        self._clock = 0  # accesses so far: orders ties by recency within a step too
        self._last_access = [-1] * num_experts  # access clock of the last access, -1: never

    @abstractmethod
    def score(self, expert: int) -> float:
        """Worth of keeping ``expert`` now; higher stays longer."""

    def count_use(self, expert: int) -> None:
        """Update ``expert``'s statistics for one access (called before its recency is updated)."""

    def on_access(self, expert: int, hit: bool) -> None:
        self.count_use(expert)
        self._last_access[expert] = self._clock
        self._clock += 1

    def on_evict(self, expert: int) -> None:
        pass

    def on_step_end(self) -> None:
        self.step += 1

    def choose_victim(self, resident: Collection[int], pinned: Collection[int]) -> int:
        candidates = [e for e in resident if e not in pinned]
        return min(candidates, key=lambda e: (self.score(e), self._last_access[e], e))


class LFRUPolicy(ScoredPolicy):
    """LFRU, as vLLM PR 37190 scores its expert cache: ``freq / (clock - last + 1)``.

    ``freq``: accesses since the expert entered (forgotten when it leaves: the
    count is the cache entry's, our reading of the PR); ``clock - last``: steps
    since its last access, so an expert of the current step divides by 1. The
    PR reports LFRU with 8 slots beating LRU with 16; tinyserve measured its hit
    rate gain turning into a 12% slowdown.
    """

    name = "lfru"

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self._freq = [0] * num_experts
        self._last_step = [0] * num_experts

    def count_use(self, expert: int) -> None:
        self._freq[expert] += 1
        self._last_step[expert] = self.step

    def on_evict(self, expert: int) -> None:
        self._freq[expert] = 0

    def score(self, expert: int) -> float:
        return self._freq[expert] / (self.step - self._last_step[expert] + 1)


class DecayedCounts:
    """Per-expert use counts that halve every ``half_life_steps`` steps (decayed lazily)."""

    def __init__(self, num_experts: int, half_life_steps: float) -> None:
        if half_life_steps <= 0:
            raise ValueError(f"half_life_steps must be positive, got {half_life_steps}")
        self._factor = 0.5 ** (1.0 / half_life_steps)  # decay per step
        self._count = [0.0] * num_experts
        self._at = [0] * num_experts  # step the stored count refers to

    def value(self, expert: int, step: int) -> float:
        """The count of ``expert`` as of ``step`` (not before its last update)."""
        return self._count[expert] * self._factor ** (step - self._at[expert])

    def add(self, expert: int, step: int, amount: float = 1.0) -> None:
        self._count[expert] = self.value(expert, step) + amount
        self._at[expert] = step


class EWMAPolicy(ScoredPolicy):
    """moe-surgeon's idea: an exponentially weighted mean of use per expert, kept across evictions.

    Each step moves an expert's mean toward 1 if the step used it, toward 0 if
    not: ``m = (1 - alpha) * m + alpha * used``. moe-surgeon reports 7-29% fewer
    bytes read than LFRU in trace replay.
    """

    name = "ewma"

    #: its constant is not published; of 0.05, 0.1, 0.2, 0.3 and 0.5, 0.05 did best on the
    #: Mixtral humaneval trace (the tuning trace of ``decay`` too), so it gets its best shot
    alpha: float = 0.05

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        # an EWMA is a decayed count of used steps, scaled by alpha (which does not change the order)
        self._counts = DecayedCounts(num_experts, math.log(0.5) / math.log(1.0 - self.alpha))
        self._used_step = [-1] * num_experts

    def count_use(self, expert: int) -> None:
        if self._used_step[expert] != self.step:  # once per step, however many passes use it
            self._used_step[expert] = self.step
            self._counts.add(expert, self.step)

    def score(self, expert: int) -> float:
        return self._counts.value(expert, self.step)


class DecayPolicy(ScoredPolicy):
    """Ours: the exact decayed use count, half-life 32 steps, kept across evictions.

    llama.cpp's count without its log2 classes (which throw away the order within
    a class and leave it to recency) and with a quarter of its half-life; every
    access counts (a step whose passes use an expert twice counts it twice).
    With one pass per step (batch-1 decode) it orders experts exactly as ``ewma``
    with alpha = 1 - 2**(-1/32) = 0.021 would: what is ours is the measured
    constant, not the form. Tuned on the Mixtral humaneval trace, checked on
    Mixtral gsm8k and Qwen1.5-MoE.
    """

    name = "decay"

    #: swept 8-256 steps on Mixtral humaneval: 24-32 best at 50% of the experts (0.620; 8 and 128
    #: give 0.615 and 0.616), 16-64 tie at 25%; on Qwen1.5-MoE at 50% 32-64 are best, 8 loses 2 points
    half_life_steps: float = 32.0

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self._counts = DecayedCounts(num_experts, self.half_life_steps)

    def count_use(self, expert: int) -> None:
        self._counts.add(expert, self.step)

    def score(self, expert: int) -> float:
        return self._counts.value(expert, self.step)


class Log2DecayPolicy(DecayPolicy):
    """llama.cpp's expert cache: a decayed use count, compared in classes of log2(count).

    The count survives eviction and halves every 128 tokens (llama.cpp's
    half-life); experts in the same class ``floor(log2(count))`` are equal and
    the least recent of them leaves. Counts below 1 share the lowest class.
    (llama.cpp also never evicts what the current step needs: here every
    policy's ``pinned``.)
    """

    name = "log2decay"

    #: llama.cpp's half-life, in tokens (one decode step per token)
    half_life_steps: float = 128.0

    def score(self, expert: int) -> float:
        count = self._counts.value(expert, self.step)
        return float(math.floor(math.log2(count))) if count >= 1.0 else -1.0


#: name -> class, for ``replacement.make_policy``
FREQUENCY_POLICIES: dict[str, type[ScoredPolicy]] = {
    cls.name: cls for cls in (LFRUPolicy, Log2DecayPolicy, EWMAPolicy, DecayPolicy)
}
