"""The drafter: everything lookahead does per step that needs no vLLM, compiled (`kernels`).

The algorithm is `reference_drafter.ReferenceDrafter`'s, chain for chain (a property test drives
both with the same traffic): per request the text indexed for longest-suffix matches, the
trajectory pool and the Jacobi window; per engine the acceptance model, the step cost model and
the cross-request corpus. What differs is where it runs: the per-step work of the whole batch is
two numba calls over flat arrays (`kernels.sync_batch`, `kernels.compose_batch`). Python maps
request ids to slots, admits and frees requests, keeps the cost model (one fit per step) and the
shared corpus's bookkeeping, and turns the output array into the lists vLLM wants.

Memory: every structure is counted (bytes of the arrays in the store, the fixed per-slot arrays,
the shared sequences) against `LookaheadConfig.memory_budget_mib`; past it, at the end of the step
or admission that passed it, the drafter evicts, least useful first: the shared corpus's oldest
sequences, then the largest trajectory pools, then the largest texts with their indexes (that
request then drafts from its pool and Jacobi window only, and its output is not shared).
"""

from __future__ import annotations

import dataclasses
import operator
import zlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from vllm_lookahead import kernels as kn
from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError, RequestOptions
from vllm_lookahead.context_index import ORDERS
from vllm_lookahead.estimator import (
    FILL_FEATURE,
    POOL_HITS,
    SUPPORT_LEVELS,
    AcceptanceModel,
    CostModel,
    Source,
    copy_primary,
    jacobi_primary,
    pool_primary,
)
from vllm_lookahead.reference_drafter import (
    _SWEEP_EVERY_STEPS,
    CPU_STEP_COST_PRIOR,
    BaseDrafter,
    LookaheadStats,
)
from vllm_lookahead.trajectory import RequestInfo, Requests, RequestSource, StepTrajectory

__all__ = ["LookaheadDrafter", "LookaheadStats", "RequestInfo", "RequestSource", "Source"]

_MASK64 = (1 << 64) - 1
_HITS_TABLE = 64
"""Hits rows of the pool feature table; pool_primary saturates far below (POOL_HITS)."""
_NONE = np.zeros(0, dtype=np.int64)
ADMIT_CHUNK = 4096
"""vLLM's prefill tokens per step (`max_num_batched_tokens`) where the engine does not say: a
request's prompt is indexed while vLLM prefills it, up to where vLLM can have got by the end of
each step, so that indexing a long prompt costs each step no more than its share of what vLLM
prefills in it, and no step stalls for a whole long prompt (32k tokens: about 5 ms on this
project's CPU). Whatever remains is indexed at the first sample, where the reference drafter
indexes it whole (the same index, the same chains)."""


def _headroom(prompt_len: int, max_new_tokens: int | None) -> int:
    """Tokens of output the text index is sized for at admission, beside the prompt: what the
    request may generate, up to the prompt's length (at most twice the index the prompt needs).
    Without it a prompt that fills its tables to the load they are sized for outgrows them from
    its first tokens on: each table is rehashed in a step of its own, one after another (a
    2k-token prompt: about 0.2 ms for all eight)."""
    return min(max_new_tokens or 0, prompt_len)


_STAT_FIELDS = ("chains", "draft_tokens", "cut_tokens", "verified_chains", "verified_tokens",
                "accepted_tokens", "trajectory_ngrams", "resyncs")


@dataclasses.dataclass(eq=False)
class SlotHandle:
    """A live request's slot in the store; a new request under the same id gets a new handle."""

    req_id: str
    slot: int
    owner: object
    namespace: str | None
    share: bool
    prompt: np.ndarray | None = None
    """The prompt as stored, until the first sample: it is being indexed (`indexed` tokens so
    far); the kernels see the slot only once the prompt is whole."""
    indexed: int = 0


class AcceptanceView:
    """One acceptance model (greedy or sampled) inside the compiled drafter's tables."""

    def __init__(self, tables: np.ndarray, index: int) -> None:
        self._tables = tables
        self._index = index

    def p(self, feature: int) -> float:
        return float(self._tables[2, self._index, feature])

    def table(self) -> list[float]:
        return self._tables[2, self._index].tolist()


class LookaheadDrafter(BaseDrafter[SlotHandle]):
    def __init__(self, cfg: LookaheadConfig, num_speculative_tokens: int, max_model_len: int,
                 adaptive: bool = False,
                 step_cost_prior: tuple[float, float, float] = CPU_STEP_COST_PRIOR,
                 prefill_chunk: int | None = None) -> None:
        super().__init__(cfg, num_speculative_tokens, max_model_len, adaptive, step_cost_prior)
        if max_model_len + num_speculative_tokens >= kn.MAX_TEXT:
            raise LookaheadConfigError(
                f"lookahead indexes at most {kn.MAX_TEXT - 1:,} tokens per request, but "
                f"max_model_len is {max_model_len:,}; serve this model with a smaller "
                "--max-model-len or without lookahead")
        self.prefill_chunk = prefill_chunk or ADMIT_CHUNK
        self.indexed_in_prefill = 0
        """Prompt tokens indexed in steps that prefilled them, before the first sample."""
        self._stats = LookaheadStats()
        self._counters = np.zeros(kn.T_FIELDS, dtype=np.int64)
        self.budget_bytes = cfg.memory_budget_mib << 20
        self.evictions = 0
        self._init_acceptance()
        self._init_tables()
        self._slots_cap = 0
        self._free: list[int] = []
        self._store = kn.new_store(0)
        self._grow_slots(16)
        self._batch_cap = 0
        self._grow_batch(16)
        self._ready: dict[str, int] = {}
        """Slot of every live request whose prompt is indexed (the step's fast path)."""
        self._steady_rows: list[str] | None = None
        """The rows of the last step whose slots came from `_ready`, while `rowsin[0]` still holds
        those slots: the same rows again need no lookup (vLLM keeps its batch's order)."""
        self._namespaces: dict[str | None, int] = {}
        self._nsmap = np.full(8, -1, dtype=np.int64)
        self.shared = SharedStore(self, cfg.shared_pool_tokens)

    # --- set-up ---------------------------------------------------------------------------

    def _init_acceptance(self) -> None:
        # Sampled requests accept a draft with the target's probability of it, not its argmax:
        # they learn their own acceptance (index 0 sampled, 1 greedy).
        models = [AcceptanceModel(), AcceptanceModel()]
        self._acc = np.stack([np.stack([m.accepted, m.seen, np.array(m.table())])
                              for m in models], axis=1).astype(np.float64)
        # The same powers the reference computes (`decay ** len(touched)`), so that no pow()
        # implementation of the compiled code can differ in the last bit.
        self._fl = np.array([float(models[0]._floor),
                             *(models[0]._decay ** n for n in range(self.k + 2))])
        self.acceptance = {True: AcceptanceView(self._acc, 1),
                           False: AcceptanceView(self._acc, 0)}
        self._arrays_replaced()

    def _init_tables(self) -> None:
        """`kernels.step`'s integer parameters: the configuration, the orders and the primary
        feature of every kind of evidence, from the estimator's own functions."""
        cfg, k = self.cfg, self.k
        c, mkl = cfg.ngram_size - 1, cfg.max_key_len
        copy = [copy_primary(shared, order, consistent) for shared in (False, True)
                for order in (*ORDERS, *[0] * (kn.NORD_MAX - len(ORDERS)))
                for consistent in (False, True)]
        jacobi = [jacobi_primary(pos) for pos in range(k + 1)]
        pool = [pool_primary(max(key_len, 1), max(hits, 1), j) for key_len in range(mkl + 1)
                for hits in range(_HITS_TABLE + 1) for j in range(c)]
        assert POOL_HITS <= _HITS_TABLE
        header = [0] * kn.C_FIELDS
        for field, value in ((kn.C_K, k), (kn.C_CONT, c), (kn.C_MKL, mkl),
                             (kn.C_G, cfg.guess_set_size), (kn.C_LIN, c - 1 + mkl - 1),
                             (kn.C_MAXLEN, self.max_model_len), (kn.C_SUPPORT, SUPPORT_LEVELS),
                             (kn.C_FILLFEAT, FILL_FEATURE), (kn.C_NORD, len(ORDERS)),
                             (kn.C_HITS, _HITS_TABLE),
                             (kn.C_TPOOL, kn.T_JAC + len(jacobi))):
            header[field] = value
        orders = [*ORDERS, *[0] * (kn.NORD_MAX - len(ORDERS))]
        self._tabs = np.array([*header, *orders, *copy, *jacobi, *pool], dtype=np.int64)
        self._grid = np.empty((k + 1, c + mkl), dtype=np.int64)
        self._arrays_replaced()

    def _grow_slots(self, capacity: int) -> None:
        k, lin = self.k, int(self._tabs[kn.C_LIN])
        old = self._slots_cap
        fresh = {
            "_meta": np.zeros((capacity, kn.M_FIELDS), dtype=np.int64),
            "_rng": np.zeros(capacity, dtype=np.uint64),
            "_jw": np.zeros((capacity, 4, k + 1), dtype=np.int32),
            "_jl": np.zeros((capacity, 2, k + 1, lin), dtype=np.int32),
        }
        for name, array in fresh.items():
            if old:
                array[:old] = getattr(self, name)
            setattr(self, name, array)
        for _ in range((capacity - old) * kn.NREG):
            self._store.append(kn.EMPTY)
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._slots_cap = capacity
        self._arrays_replaced()

    def _grow_batch(self, rows: int) -> None:
        k = self.k
        self._out = np.zeros((3, rows, k), dtype=np.int32)  # tokens, sources, features
        self._out_len = np.zeros(rows, dtype=np.int32)
        self._out_reach = np.zeros((rows, k), dtype=np.float64)
        self._rowsin = np.zeros((2, rows), dtype=np.int32)
        self._flat = np.zeros(rows * k, dtype=np.int32)
        self._steady_rows = None
        self._batch_cap = rows
        self._arrays_replaced()

    def _arrays_replaced(self) -> None:
        """After any array the kernels keep was replaced: recount the fixed bytes, bind the
        step's state again."""
        self._fixed: int | None = None
        self._step_state: kn.StepState | None = None

    def _kernel_state(self) -> kn.StepState:
        if self._step_state is None:
            self._step_state = kn.bind_step_state(
                self._store, self._meta, self._rng, self._jw, self._jl, self._acc, self._fl,
                self.cost.state, self._tabs, self._nsmap, self._counters, self._out,
                self._out_len, self._out_reach, self._flat, self._grid)
        return self._step_state

    def _new_slot(self, kind: int) -> int:
        if not self._free:
            self._grow_slots(2 * self._slots_cap)
        slot = self._free.pop()
        self._meta[slot] = 0
        self._meta[slot, kn.M_KIND] = kind
        self._jw[slot] = 0
        self._rng[slot] = 0
        return slot

    def _free_slot(self, slot: int) -> None:
        kn.free_slot(self._store, self._meta, self._counters, slot)
        self._free.append(slot)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) every kernel with a tiny batch, so that the
        first engine step does not wait for it. The warm-up request does not share its output:
        nothing of it may reach a real request's drafts."""
        requests = Requests()
        requests.add("warm-up", 3, RequestOptions(share=False))
        tokens = np.array([[1, 2, 3, 1, 2]], dtype=np.int32)
        for dtype in (np.int32, np.int64):
            traj = StepTrajectory(["warm-up"], np.array([3]), np.array([0, 1]),
                                  lambda: (np.array([1]), np.array([1])))
            self.draft_batch(["warm-up"], [[1]], np.array([3]), tokens.astype(dtype), None,
                             requests, 0.01)
            self.draft_batch(["warm-up"], [[1, 2]], np.array([5]), tokens.astype(dtype), traj,
                             requests, 0.01)
            self.remove("warm-up")
        self._counters[:kn.T_TOTAL] = 0
        self._stats = LookaheadStats()
        self._init_acceptance()
        self.cost = CostModel(self._cost_prior)
        self._arrays_replaced()

    # --- the step ---------------------------------------------------------------------------

    def draft_batch(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                    num_tokens: np.ndarray, token_ids: np.ndarray,
                    trajectory: StepTrajectory | None, requests: RequestSource,
                    step_seconds: float | None = None) -> list[list[int]]:
        """The next chain of every row. `step_seconds`, the wall time of the step just verified,
        teaches the cost model."""
        self._stats.steps += 1
        batch = len(req_ids)
        if batch > self._batch_cap:
            self._grow_batch(max(batch, 2 * self._batch_cap))
        rowsin = self._rowsin[:, :batch]
        admitted, every_row = self._slots_of(req_ids, sampled, token_ids, requests, rowsin)
        tb, tcu, tidx, fd, fy = self._trajectory_rows(req_ids, trajectory)
        # The step time counts only for steps that verified nothing but these chains.
        observe = step_seconds is not None and not admitted and every_row
        total = kn.step(self._kernel_state(), rowsin, num_tokens, token_ids, tb, tcu, tidx, fd,
                        fy, int(observe) | (2 if self.adaptive else 0),
                        step_seconds if observe else 0.0)
        drafts = self._chains(batch, total)
        if self._stats.steps % _SWEEP_EVERY_STEPS == 0:
            self._sweep(requests)
        self._enforce_budget()
        return drafts

    def _chains(self, batch: int, total: int) -> list[list[int]]:
        """The chains as the lists vLLM wants, from the kernel's end-to-end copy of them."""
        if not total:
            return [[] for _ in range(batch)]
        flat = self._flat[:total].tolist()
        if batch == 1:
            return [flat]
        chains = []
        start = 0
        for n in self._out_len[:batch].tolist():
            chains.append(flat[start:start + n])
            start += n
        return chains

    def _slots_of(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                  token_ids: np.ndarray, requests: RequestSource, rowsin: np.ndarray,
                  ) -> tuple[bool, bool]:
        """Each row's slot (-1: nothing committed this step) and sample count into `rowsin`,
        admitting new requests; returns whether a prompt was completed (a request's first
        sample, where the reference admits it) and whether every row has a slot. In the steady
        state (every row known, indexed and sampled) without a loop over the rows."""
        if req_ids != self._steady_rows:  # else rowsin[0] holds these rows' slots already
            slots = list(map(self._ready.get, req_ids))
            if None in slots:
                return self._slots_of_each(req_ids, sampled, token_ids, requests, rowsin)
            rowsin[0] = slots
            self._steady_rows = list(req_ids)
        if not (all(sampled) and self._owners_current(req_ids, requests)):
            return self._slots_of_each(req_ids, sampled, token_ids, requests, rowsin)
        rowsin[1] = list(map(len, sampled))
        return False, True

    def _owners_current(self, req_ids: Sequence[str], requests: RequestSource) -> bool:
        """Whether every row's request is the one its state was made for, not another under the
        same id (nothing to check where the engine reports every removal)."""
        if getattr(requests, "reports_removals", False):
            return True
        states = self.states
        return all(map(operator.is_, map(requests.owner, req_ids),
                       (states[req_id].owner for req_id in req_ids)))

    def _slots_of_each(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                       token_ids: np.ndarray, requests: RequestSource, rowsin: np.ndarray,
                       ) -> tuple[bool, bool]:
        """`_slots_of` row by row, admitting requests and indexing prompts."""
        self._steady_rows = None
        slots = []
        admitted = False
        states, owner = self.states, requests.owner
        for row, (req_id, sample) in enumerate(zip(req_ids, sampled, strict=True)):
            handle = states.get(req_id)
            if handle is None or owner(req_id) is not handle.owner:
                handle = self._admit(row, req_id, token_ids[row], requests)
            if not sample:
                # A prefill chunk or a discarded sample: nothing was committed. A prompt being
                # prefilled is indexed meanwhile, as far as vLLM's prefill can reach this step.
                if handle.prompt is not None:
                    before = handle.indexed
                    self._index_prompt(handle, requests.prefilled(req_id) + self.prefill_chunk)
                    self.indexed_in_prefill += handle.indexed - before
                slots.append(-1)
                continue
            if handle.prompt is not None:
                self._index_prompt(handle, len(handle.prompt))
                handle.prompt = None
                self._ready[req_id] = handle.slot
                admitted = True
            slots.append(handle.slot)
        rowsin[0] = slots
        rowsin[1] = [len(sample) for sample in sampled]
        return admitted, -1 not in slots

    def _trajectory_rows(self, req_ids: Sequence[str], trajectory: StepTrajectory | None,
                         ) -> tuple[np.ndarray, ...]:
        """The trajectory's bases, draft offsets, each row's index in it (-1: none; empty: the
        rows are the trajectory's) and the flat drafts and predictions, for `kernels.step`
        (all empty: no drafts)."""
        if trajectory is None:
            return _NONE, _NONE, _NONE, _NONE, _NONE
        cu = np.asarray(trajectory.cu_drafts, dtype=np.int64)
        if cu.item(-1) == cu.item(0):  # no row has drafts
            return _NONE, _NONE, _NONE, _NONE, _NONE
        if trajectory.req_ids == req_ids or list(trajectory.req_ids) == list(req_ids):
            index = _NONE
        else:
            where = {rid: i for i, rid in enumerate(trajectory.req_ids)}
            index = np.array([where.get(rid, -1) for rid in req_ids], dtype=np.int64)
        drafts, argmax = trajectory.arrays()
        return (np.asarray(trajectory.bases, dtype=np.int64), cu, index,
                np.ascontiguousarray(drafts, dtype=np.int64),
                np.ascontiguousarray(argmax, dtype=np.int64))

    # --- requests -------------------------------------------------------------------------

    def _admit(self, row: int, req_id: str, tokens: np.ndarray,
               requests: RequestSource) -> SlotHandle:
        """A slot for a request seen for the first time, its prompt not yet indexed."""
        old = self.states.pop(req_id, None)
        if old is not None:
            self._release(old)
        info = requests.info(row, req_id)
        num_prompt = info.num_prompt_tokens
        prompt = np.array(tokens[:num_prompt], dtype=np.int32)
        if info.prompt_mask is not None:
            prompt[~np.asarray(info.prompt_mask, dtype=bool)] = -1
        # The Jacobi window starts from real prompt tokens (LADE's padding), whatever the pool.
        real = prompt[prompt >= 0].astype(np.int64)
        stops = np.array(sorted(info.stop_token_ids), dtype=np.int64)
        fill = real[~np.isin(real, stops)]
        share = info.options.share and self.cfg.shared_pool_tokens > 0
        slot = self._new_slot(1)
        meta = self._meta[slot]
        meta[kn.M_NPROMPT] = num_prompt
        meta[kn.M_COMMITTED] = num_prompt
        meta[kn.M_LAST] = int(tokens[num_prompt - 1])
        meta[kn.M_BUDGET] = info.options.chain_budget(self.k)
        meta[kn.M_GREEDY] = int(info.greedy)
        meta[kn.M_NSID] = self._namespace_id(info.options.namespace) if share else -1
        meta[kn.M_NFILL] = len(fill)
        meta[kn.M_NSTOPS] = len(stops)
        # Seeded by the prompt as well, so runs are reproducible whatever vLLM's request ids are.
        self._rng[slot] = (self.cfg.seed * 0x100000001B3 + zlib.crc32(real.tobytes())) & _MASK64
        kn.set_region(self._store, self._meta, self._counters, slot, kn.R_FILL,
                      fill.astype(np.int32))
        kn.set_region(self._store, self._meta, self._counters, slot, kn.R_STOPS,
                      stops.astype(np.int32))
        if not self.cfg.pool_from_prompt:
            # Never copied from (LADE's POOL_FROM_PROMPT off); placeholders keep positions aligned.
            prompt[:] = -1
        kn.reserve_text(self._store, self._meta, self._counters, slot,
                        len(prompt) + _headroom(len(prompt), info.max_new_tokens), self._tabs)
        handle = SlotHandle(req_id, slot, info.owner, info.options.namespace, share, prompt)
        self.states[req_id] = handle
        return handle

    def _index_prompt(self, handle: SlotHandle, upto: int) -> None:
        """Extend the slot's text with its prompt up to `upto` tokens."""
        assert handle.prompt is not None
        upto = min(upto, len(handle.prompt))
        if upto > handle.indexed:
            kn.extend_text(self._store, self._meta, self._counters, handle.slot,
                           handle.prompt[handle.indexed:upto], self._tabs)
            handle.indexed = upto
            self._enforce_budget()

    def _namespace_id(self, namespace: str | None) -> int:
        nsid = self._namespaces.setdefault(namespace, len(self._namespaces))
        if nsid >= len(self._nsmap):
            self._nsmap = np.concatenate([self._nsmap, np.full(len(self._nsmap), -1)])
            self._arrays_replaced()
        return nsid

    def _release(self, handle: SlotHandle) -> None:
        """A finished request's output joins its namespace's shared corpus; its slot is freed."""
        self._ready.pop(handle.req_id, None)
        self._steady_rows = None
        if handle.share and not self._meta[handle.slot, kn.M_NOINDEX]:
            meta = self._meta[handle.slot]
            text = self._store[handle.slot * kn.NREG + kn.R_TEXT]
            self.shared.add(handle.namespace,
                            text[meta[kn.M_NPROMPT]:meta[kn.M_TEXT_LEN]].copy())
        self._free_slot(handle.slot)

    def _sweep(self, requests: RequestSource) -> None:
        """Free states vLLM no longer knows, for versions without a removal hook."""
        for req_id in [r for r, h in self.states.items() if requests.owner(r) is not h.owner]:
            self.remove(req_id)

    # --- memory -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held: every region of the store, the per-slot and per-row arrays, the shared
        corpus's retained sequences and the acceptance tables."""
        if self._fixed is None:  # recounted after any of these arrays grew
            self._fixed = sum(a.nbytes for a in (
                self._meta, self._rng, self._jw, self._jl, self._out, self._out_len,
                self._out_reach, self._rowsin, self._flat,
                self._acc, self._nsmap, self._tabs, self._grid))
        return self._counters.item(kn.T_TOTAL) + self._fixed + self.shared.sequence_bytes

    def _enforce_budget(self) -> None:
        if self.nbytes() <= self.budget_bytes:
            return
        self.evictions += 1
        self.shared.evict_until(lambda: self.nbytes() <= self.budget_bytes)
        live = [h.slot for h in self.states.values()]
        for region_bytes, clear in ((self._pool_bytes, self._clear_pool),
                                    (self._index_bytes, self._clear_index)):
            for slot in sorted(live, key=region_bytes, reverse=True):
                if self.nbytes() <= self.budget_bytes or region_bytes(slot) == 0:
                    break
                clear(slot)

    def _region_bytes(self, slot: int, regions: Sequence[int]) -> int:
        return sum(4 * len(self._store[slot * kn.NREG + r]) for r in regions)

    def _pool_bytes(self, slot: int) -> int:
        return self._region_bytes(slot, (kn.R_PHASH, kn.R_PKEYS, kn.R_PNODES))

    def _index_bytes(self, slot: int) -> int:
        return self._region_bytes(slot, (kn.R_INDEX, kn.R_TEXT))

    def _clear_pool(self, slot: int) -> None:
        kn.clear_pool(self._store, self._meta, self._counters, slot)

    def _clear_index(self, slot: int) -> None:
        kn.evict_text(self._store, self._meta, self._counters, slot, self._tabs)

    # --- statistics -------------------------------------------------------------------------

    @property
    def stats(self) -> LookaheadStats:
        """The counters, brought up to date from the kernels' array on every read."""
        counters = self._counters.tolist()
        stats = self._stats
        for i, name in enumerate(_STAT_FIELDS):
            setattr(stats, name, counters[i])
        stats.drafted_by_source = counters[kn.T_DRAFTED:kn.T_DRAFTED + len(Source)]
        stats.accepted_by_source = counters[kn.T_ACC_SRC:kn.T_ACC_SRC + len(Source)]
        return stats

    def snapshot(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["config"] = self.cfg.to_dict()
        d["num_speculative_tokens"] = self.k
        d["adaptive"] = self.adaptive
        d["live_requests"] = len(self.states)
        requests = self._meta[:, kn.M_KIND] == 1
        d["pool_continuations"] = int(self._meta[requests, kn.M_NCONT].sum())
        d["pool_keys"] = int(self._meta[requests, kn.M_NKEYS].sum())
        d["pool_bytes"] = self.nbytes()
        d["memory_budget_bytes"] = self.budget_bytes
        d["memory_evictions"] = self.evictions
        d["shared_tokens"] = len(self.shared)
        d["prompt_tokens_indexed_in_prefill"] = self.indexed_in_prefill
        d["token_cost_s"] = self.cost.token_cost
        d["step_cost_fit"] = self.cost.theta.tolist()
        return d


class SharedStore:
    """`context_index.SharedCorpus` over the store: one namespace slot (text and index) per
    namespace, the oldest sequences dropped past the token budget, a namespace's index rebuilt
    from what it retains once a quarter of its text is stale (the same schedule as the
    reference, so that both match the same text)."""

    def __init__(self, drafter: LookaheadDrafter, max_tokens: int) -> None:
        self._d = drafter
        self.max_tokens = max_tokens
        self._slots: dict[str | None, int] = {}
        self._sequences: dict[str | None, deque[np.ndarray]] = {}
        self._order: deque[str | None] = deque()
        self.retained = 0

    def __len__(self) -> int:
        return self.retained

    @property
    def sequence_bytes(self) -> int:
        return 4 * self.retained

    def add(self, namespace: str | None, tokens: np.ndarray) -> None:
        if not len(tokens) or self.max_tokens <= 0:
            return
        seq = np.asarray(tokens[-self.max_tokens:], dtype=np.int32)
        if namespace not in self._slots:
            slot = self._d._new_slot(2)
            self._slots[namespace] = slot
            self._sequences[namespace] = deque()
            self._d._nsmap[self._d._namespace_id(namespace)] = slot
        self._sequences[namespace].append(seq)
        self._order.append(namespace)
        self.retained += len(seq) + 1
        self._extend(self._slots[namespace], seq)
        stale: set[str | None] = set()
        while self.retained > self.max_tokens:
            stale.add(self._drop_oldest())
        for ns in stale:
            self._rebuild_if_stale(ns)

    def evict_until(self, done: Any) -> None:
        """Drop the oldest sequences until `done()` (the memory budget)."""
        while self._order and not done():
            self._rebuild_if_stale(self._drop_oldest())

    def _drop_oldest(self) -> str | None:
        oldest = self._order.popleft()
        self.retained -= len(self._sequences[oldest].popleft()) + 1
        return oldest

    def _extend(self, slot: int, seq: np.ndarray) -> None:
        d = self._d
        kn.extend_text(d._store, d._meta, d._counters, slot, np.append(seq, np.int32(kn.SEP)),
                       d._tabs)

    def _rebuild_if_stale(self, namespace: str | None) -> None:
        d = self._d
        sequences = self._sequences[namespace]
        kept = sum(len(s) + 1 for s in sequences)
        slot = self._slots[namespace]
        if not sequences:
            del self._slots[namespace], self._sequences[namespace]
            d._nsmap[d._namespaces[namespace]] = -1
            d._free_slot(slot)
        elif d._meta[slot, kn.M_TEXT_LEN] > kept + kept // 4:
            kn.free_slot(d._store, d._meta, d._counters, slot)
            d._meta[slot, kn.M_KIND] = 2
            for seq in sequences:
                self._extend(slot, seq)
