"""``nextuse``: evict the expert whose next use is predicted farthest, from the routing seen so far.

Belady evicts the expert needed farthest in the future. This policy estimates
that future online, per layer, from what the layer's own cache saw (and, when
the engine passes them, the step's input token ids):

* **continuation of a repeat.** Two memories of the layer's steps, keyed by
  the step's input token id (when the engine tells it, one token per step:
  batch-1 decode, :meth:`NextUsePolicy.begin_step_tokens`) and by the set of
  experts the layer's pass needs (the router's output, known before any load).
  When the current step's key occurred before, the earlier occurrences whose
  preceding keys match longest (up to ``max_match`` steps back) are the
  *neighbours*; the experts the layer used in the ``horizon`` steps after each
  neighbour are predicted to be used again, step ``h`` after weighing
  ``match_length * gamma ** h``. The token memory is asked first; the routing
  memory when the token is unknown or never matched. Text repeats (code more
  than prose), and the same context routes alike.
* **path neighbours** (when the model's layer policies are linked,
  :func:`link_layers`: the simulator links them, the engine those of a shared
  pool, ``core/shared_pool.py``). When
  layer ``l`` evicts, layers ``0..l`` of the running step are routed. The
  ``path_neighbours`` earlier steps sharing the most experts with it over those
  layers (:class:`StepPaths`, the last 1024 steps) vote for what layer ``l``
  used in the ``horizon`` steps after them, step ``h`` weighing ``gamma ** h``
  times the neighbour's share of the summed similarity, all times
  ``path_weight``; added to the memories' prediction. The same hidden state
  routes alike through the earlier layers, and its continuation alike too.
* **decayed frequency.** A use count halving every 32 steps and kept after
  eviction (``decay``'s), as a rate of use per step, added to the prediction:
  it orders the experts no neighbour predicts.
* the experts the current pass needs are never evicted (``pinned``, plus the
  pass's needs the simulator's sequential order has not served yet, told by
  :meth:`NextUsePolicy.begin_pass_needs`).

In the engine, ``integration/policy_inputs.py`` tells the step's token (batch-1
decode) and each pass's needs; it links the layers of a shared pool only (with pools per layer the
path neighbours are off). A shared pool asks each layer's policy for :meth:`NextUsePolicy.predicted_uses`
and weighs them into its own rule; the policy's :meth:`~NextUsePolicy.choose_victim` is not used
there. Nothing here sees the future: a neighbour's continuation is taken only from
steps already ended. The memories live as long as the policy; the
simulator's per-sequence replay hands it from one sequence's cache to the next
(:meth:`NextUsePolicy.inherit`), as the engine's policy keeps it across requests.

Also tried, on Mixtral humaneval at 4 of 8 slots, each with the current pass
pinned (``decay`` that way: 0.643): a per-layer Markov table (the experts of
step t -> use at t + h, h <= 1..16, learned online) 0.644-0.647; neighbours
chosen by routing similarity over the other layers of the same step instead of
token ids 0.664-0.667 (against 0.666 by token ids in one sequence); they are
not kept. What was tuned on which trace: ``horizon`` (1, 2, 4, 8: 4),
``gamma`` (0.5, 0.7, 0.9: 0.7), the token-key ``neighbours`` (1, 3, 5: 1) and
the weight of the frequency term (1, 4, 10: 1) on Mixtral humaneval only; the
routing-key ``neighbours`` (1 or 3: 3) on all three shared traces (each
preferred 3). Asking the routing memory only when the token memory has no
match was chosen for robustness (a trace of novel tokens still gets
predictions); summing both instead gives 0.671 / 0.631 on humaneval / gsm8k
against 0.671 / 0.628 (the token memory alone: 0.672 / 0.626).

Path neighbours took humaneval at 4 of 8 from 0.671 to 0.675 (gsm8k 0.629 ->
0.638, Qwen at 30 of 60 0.630 -> 0.644, at 15 of 60 0.374 -> 0.393), no trace
or budget losing. Its constants were chosen on all five traces (the three
shared ones, tiny-mixtral's and tiny-pymoe's), where the optimum is flat:
``path_neighbours`` 1, 3, 5, 8 (5; 1 loses 0.007 on Qwen), ``path_weight`` 1,
3, 5, 10 (3; 1 loses 0.002 on humaneval), the window 256, 1024 or unbounded
(equal). Using the path neighbours alone (without the memories) reaches 0.674 /
0.638 / 0.641, and as the fallback after the token memory 0.674 / 0.634 /
0.641. Keys combining the previous layer's routing with the layer's own (exact
matches in the continuation memory) instead gained at most 0.004 anywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from vllm_moe_offload.core.frequency import DecayedCounts, ScoredPolicy


class _Barrier:
    """A context key equal to nothing: separates sequences in a memory."""

    __slots__ = ()


class ContinuationMemory:
    """One layer's history of (context key, experts used) per step, indexed by key.

    Bounded: at most ``max_steps`` steps (the oldest are forgotten in halves)
    and, per key, the ``max_occurrences`` latest steps it occurred at.
    """

    def __init__(self, max_steps: int = 4096, max_occurrences: int = 16) -> None:
        if max_steps < 2 or max_occurrences < 1:
            raise ValueError(f"max_steps must be >= 2 and max_occurrences >= 1, got {max_steps}, {max_occurrences}")
        self.max_steps = max_steps
        self.max_occurrences = max_occurrences
        self._keys: list[object] = []
        self._sets: list[frozenset[int]] = []
        self._base = 0  # global index of _keys[0]
        self._where: dict[object, list[int]] = {}  # key -> global indices, oldest first

    def __len__(self) -> int:
        """Steps recorded so far (the global index of the next one)."""
        return self._base + len(self._keys)

    def record(self, key: object, experts: Collection[int]) -> None:
        """Append one ended step: its context key and the experts the layer used."""
        index = len(self)
        self._keys.append(key)
        self._sets.append(experts if isinstance(experts, frozenset) else frozenset(experts))
        if not isinstance(key, _Barrier):
            where = self._where.setdefault(key, [])
            where.append(index)
            if len(where) > self.max_occurrences:
                del where[0]
        if len(self._keys) > self.max_steps:
            drop = len(self._keys) // 2
            self._base += drop
            del self._keys[:drop], self._sets[:drop]
            self._where = {k: kept for k, v in self._where.items() if (kept := [i for i in v if i >= self._base])}

    def break_sequence(self) -> None:
        """Mark a new sequence: no match runs across this point (a continuation reaches only an empty step)."""
        self.record(_Barrier(), ())

    def record_unkeyed(self, experts: Collection[int]) -> None:
        """Append a step whose key is unknown: it matches nothing but continues earlier matches."""
        self.record(_Barrier(), experts)

    def predict(
        self, key: object, neighbours: int, horizon: int, gamma: float, max_match: int
    ) -> dict[int, float]:
        """Expert -> weight of its predicted use in the next ``horizon`` steps, for a step keyed ``key``.

        The current step (not recorded yet) has global index ``len(self)``; its
        preceding keys are the recorded ones.
        """
        where = self._where.get(key)
        if not where:
            return {}
        now = len(self)
        keys, base = self._keys, self._base
        found: list[tuple[int, int]] = []  # (match length, index)
        for j in reversed(where):
            m = 1
            while m < max_match and j - m >= base and keys[j - m - base] == keys[now - m - base]:
                m += 1
            found.append((m, j))
        if neighbours < len(found):
            found.sort(reverse=True)  # longest match first, then the latest
            del found[neighbours:]
        weights: dict[int, float] = {}
        for m, j in found:
            w = float(m)
            for h in range(1, horizon + 1):
                if j + h >= now:
                    break
                w *= gamma
                for expert in self._sets[j + h - base]:
                    weights[expert] = weights.get(expert, 0.0) + w
        return weights


class StepPaths:
    """The routing of a model's linked layers over its last ``window`` steps, shared by their policies.

    While a step runs, layer by layer, it keeps each stored step's *path
    similarity* to it: the experts the two steps share in the layers seen so
    far this step (layer ``l``'s policy adds its own needs before it evicts,
    so the similarity at layer ``l`` covers layers ``0..l``, all of them routed
    by then). A step is stored when every linked layer has ended it.
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 1024) -> None:
        if num_layers < 1 or num_experts < 1 or window < 2:
            raise ValueError(
                f"num_layers and num_experts must be >= 1 and window >= 2, got {num_layers}, {num_experts}, {window}"
            )
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        # [L, E, W]: 1 where the step stored in ring slot w used expert e at layer l
        self._used = np.zeros((num_layers, num_experts, window), np.int8)
        self._sets: list[list[tuple[int, ...]]] = [[()] * num_layers for _ in range(window)]  # [W][L]
        self._step_of = np.full(window, -1, np.int64)  # [W]: the global step a slot holds, -1: none or a barrier
        self._barrier = [False] * window
        self._stored = 0  # steps stored so far (global index of the next)
        self._current: list[set[int]] = [set() for _ in range(num_layers)]  # this step so far, per layer
        self._similarity = np.zeros(window, np.int32)  # [W]: shared experts with each stored step, so far
        self._ended: set[int] = set()  # layers that ended this step

    def __len__(self) -> int:
        return self._stored

    def observe(self, layer_idx: int, experts: Collection[int]) -> None:
        """Layer ``layer_idx`` of the running step uses ``experts`` (repeats are counted once)."""
        if layer_idx in self._ended:  # that layer already ended this step: a new one started
            self._store()
        current = self._current[layer_idx]
        for expert in experts:
            if expert not in current:
                current.add(expert)
                self._similarity += self._used[layer_idx, expert]

    def end_layer(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` ended the step; the last linked layer to end it stores it."""
        self._ended.add(layer_idx)
        if len(self._ended) == self.num_layers:
            self._store()

    def break_sequence(self) -> None:
        """A new sequence starts: store the running step (if any) and a barrier no continuation crosses.

        Idempotent: every layer's policy may call it at the same boundary.
        """
        if self._ended or any(self._current):
            self._store()
        if not self._stored or not self._barrier[(self._stored - 1) % self.window]:
            self._store(barrier=True)

    def _store(self, barrier: bool = False) -> None:
        slot = self._stored % self.window
        self._used[:, :, slot] = 0
        sets = [tuple(sorted(experts)) for experts in self._current]
        if not barrier:
            for layer_idx, experts in enumerate(sets):
                self._used[layer_idx, list(experts), slot] = 1
        self._sets[slot] = sets if not barrier else [()] * self.num_layers
        self._step_of[slot] = -1 if barrier else self._stored
        self._barrier[slot] = barrier
        self._stored += 1
        self._current = [set() for _ in range(self.num_layers)]
        self._similarity[:] = 0
        self._ended.clear()

    def predict(self, layer_idx: int, neighbours: int, horizon: int, gamma: float) -> dict[int, float]:
        """Expert -> predicted use of layer ``layer_idx`` over the next ``horizon`` steps, from path neighbours.

        The ``neighbours`` stored steps most similar to the running one (the
        latest first among equals; only steps whose next step has ended) each
        vote for the experts the layer used in the ``horizon`` steps after them,
        step ``h`` weighing ``similarity * gamma ** h``; the votes are divided
        by the neighbours' summed similarity (1.0: all of them foresaw that use
        one step ahead, at ``gamma = 1``).
        """
        last = self._stored - 1  # the latest stored step: its continuation has not ended
        if last < 1:
            return {}
        # one integer key per slot, similarity * (last + 1) + step: higher similarity first, then the latest;
        # <= last where the similarity is 0. One more than asked for, as the latest step may be among them.
        span = last + 1
        key = self._similarity * np.int64(span) + self._step_of  # [W]
        w, wanted = self.window, neighbours + 1
        top = np.argpartition(key, w - wanted)[w - wanted :] if wanted < w else np.arange(w)
        found = sorted((k // span, k % span) for k in key[top].tolist() if k > last and k % span < last)
        found = found[max(0, len(found) - neighbours) :] if neighbours > 0 else []  # (similarity, step), best last
        if not found:
            return {}
        total = float(sum(similarity for similarity, _ in found))
        weights: dict[int, float] = {}
        for similarity, step in found:
            weight = similarity / total
            for h in range(1, horizon + 1):
                slot = (step + h) % w
                if step + h > last or self._barrier[slot]:
                    break
                weight *= gamma
                for expert in self._sets[slot][layer_idx]:
                    weights[expert] = weights.get(expert, 0.0) + weight
        return weights


def link_layers(policies: Sequence[NextUsePolicy], num_experts: int, window: int = 1024) -> StepPaths:
    """Let one model's layer policies (in layer order) share their steps' routing: see :class:`StepPaths`."""
    paths = StepPaths(len(policies), num_experts, window)
    for layer_idx, policy in enumerate(policies):
        policy.paths, policy.layer_idx = paths, layer_idx
    return paths


class NextUsePolicy(ScoredPolicy):
    """Evicts the lowest predicted use over the next steps (see the module docstring).

    ``score(e) = continuation weight of e + decayed use rate of e``; ties go to
    the least recently accessed, then the lowest id (``ScoredPolicy``).
    """

    name = "nextuse"

    #: steps after a neighbour whose experts are predicted (tuned on Mixtral humaneval)
    horizon: int = 4
    #: weight per step of distance: step h after a neighbour weighs match_length * gamma**h
    gamma: float = 0.7
    #: neighbours followed when the key is a token id / a routing set
    token_neighbours: int = 1
    routing_neighbours: int = 3
    #: longest context compared, in steps
    max_match: int = 8
    #: the frequency term's half-life, in steps (``decay``'s)
    half_life_steps: float = 32.0
    #: path neighbours (most similar earlier steps over the layers routed so far) and the weight of their vote
    path_neighbours: int = 5
    path_weight: float = 3.0

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self.token_memory = ContinuationMemory()  # keyed by the step's input token
        self.routing_memory = ContinuationMemory()  # keyed by the layer's expert set
        self._counts = DecayedCounts(num_experts, self.half_life_steps)
        self._rate = 1.0 - 0.5 ** (1.0 / self.half_life_steps)  # count -> use per step
        self._token: int | None = None  # this step's input token, when the engine told one
        self._step_used: set[int] = set()  # experts accessed by passes this step
        self._needs: set[int] = set()  # the current pass's needs, when told
        self._predicted: dict[int, float] | None = None  # this step's prediction, once computed
        self.paths: StepPaths | None = None  # the model's layers' routing, when linked (:func:`link_layers`)
        self.layer_idx = 0  # this policy's layer among the linked ones

    # -- hooks the replay / engine may call (all optional) --

    def begin_step_tokens(self, token_ids: Sequence[int]) -> None:
        """The input token ids of the step about to run (one per sequence; -1 or negative: unknown).

        Exactly one known token makes it the step's context key; otherwise the
        layer's routing is the key.
        """
        known = [int(t) for t in token_ids if int(t) >= 0]
        self._token = known[0] if len(token_ids) == 1 and known else None
        self._predicted = None

    def begin_pass_needs(self, needed: Collection[int]) -> None:
        """All experts the pass about to be served needs (the router's output): they are never evicted."""
        self._needs = set(needed)
        if self.paths is not None:
            self.paths.observe(self.layer_idx, self._needs)

    def inherit(self, previous: NextUsePolicy) -> None:
        """Take over ``previous``'s memory (a new cache of the same layer, e.g. the next sequence's)."""
        self.token_memory = previous.token_memory
        self.token_memory.break_sequence()
        self.routing_memory = previous.routing_memory
        self.routing_memory.break_sequence()
        self.paths, self.layer_idx = previous.paths, previous.layer_idx
        if self.paths is not None:
            self.paths.break_sequence()

    # -- policy contract --

    def count_use(self, expert: int) -> None:
        self._counts.add(expert, self.step)
        self._step_used.add(expert)

    def on_step_end(self) -> None:
        if self._step_used:
            used = frozenset(self._step_used)
            if self._token is not None:
                self.token_memory.record(self._token, used)
            else:
                self.token_memory.record_unkeyed(used)
            self.routing_memory.record(used, used)
        if self.paths is not None:
            self.paths.observe(self.layer_idx, self._step_used)
            self.paths.end_layer(self.layer_idx)
        self._step_used = set()
        self._needs = set()
        self._token = None
        self._predicted = None
        super().on_step_end()

    def score(self, expert: int) -> float:
        return self._predicted.get(expert, 0.0) + self._counts.value(expert, self.step) * self._rate

    def predicted_uses(self) -> dict[int, float]:
        """Expert -> its predicted use over the layer's next ``horizon`` steps, as :meth:`score` adds it.

        Computed once per step from what the layer knows then (its step's token, the running step's routing
        so far) and kept until the step ends or a new one is told; reads the memories and the paths, changes
        neither (a shared pool asks it for layers that are not running: ``core/shared_pool.py``).
        """
        if self._predicted is None:
            self._predicted = self._predict(self._step_used.union(self._needs))
        return self._predicted

    def choose_victim(self, resident: Collection[int], pinned: Collection[int]) -> int:
        now = self._step_used.union(self._needs, pinned)
        spared = now if any(e not in now for e in resident) else pinned
        if self._predicted is None:
            if self.paths is not None:
                self.paths.observe(self.layer_idx, now)
            self._predicted = self._predict(now)
        return super().choose_victim(resident, spared)

    def _predict(self, now: set[int]) -> dict[int, float]:
        """This step's continuation weights: by the token key, else (unknown or never matched) by the routing key."""
        predicted: dict[int, float] = {}
        if self._token is not None:
            predicted = self.token_memory.predict(
                self._token, self.token_neighbours, self.horizon, self.gamma, self.max_match
            )
        if not predicted:
            predicted = self.routing_memory.predict(
                frozenset(now), self.routing_neighbours, self.horizon, self.gamma, self.max_match
            )
        if self.paths is not None:
            by_path = self.paths.predict(self.layer_idx, self.path_neighbours, self.horizon, self.gamma)
            for expert, weight in by_path.items():
                predicted[expert] = predicted.get(expert, 0.0) + self.path_weight * weight
        return predicted


#: name -> class, for ``replacement.make_policy``
PREDICTIVE_POLICIES: dict[str, type[NextUsePolicy]] = {NextUsePolicy.name: NextUsePolicy}
