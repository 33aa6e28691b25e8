"""The drafter: everything lookahead does per step that needs no vLLM.

Per request (keyed by request id) it keeps a slot in the compiled state (`request_state`: the
request's text index, trajectory pool and Jacobi window); per engine, the acceptance model, the
step cost model and the shared corpora. Each step is one compiled call over the whole batch
(`step.step`); this class maps request ids to slots, admits requests (indexing a long prompt
while vLLM prefills it), frees them, keeps the memory budget, and turns the chains into the lists
vLLM wants. `reference.drafter.ReferenceDrafter` is the same algorithm in plain Python; a property
test drives both with the same traffic and requires the same chains.

Memory: every array of the compiled state is counted (`compiled.zeros`), and so are the shared
sequences, against `LookaheadConfig.memory_budget_mib`; past it, at the end of the step or
admission that passed it, the drafter evicts, least useful first: the shared corpus's oldest
sequences, then the largest trajectory pools, then the largest texts with their indexes (that
request then drafts from its pool and Jacobi window only, and its output is not shared).
"""

from __future__ import annotations

import dataclasses
import operator
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from vllm_lookahead import chain, step
from vllm_lookahead.acceptance import (
    FILL_FEATURE,
    GREEDY,
    POOL_HITS,
    PRIOR,
    SAMPLED,
    SUPPORT_LEVELS,
    Calibration,
    acceptance_tables,
    copy_primary,
    jacobi_primary,
    new_acceptance,
    pool_primary,
)
from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError, RequestOptions
from vllm_lookahead.context_index import MAX_TEXT, ORDERS
from vllm_lookahead.counters import KERNEL_COUNTERS, LookaheadStats, read_kernel_counters
from vllm_lookahead.request_state import NO_NAMESPACE
from vllm_lookahead.shared_corpus import SharedCorpus
from vllm_lookahead.step_cost import CPU_STEP_COST_PRIOR, CostModel
from vllm_lookahead.trajectory import Requests, RequestSource, StepTrajectory

SWEEP_EVERY_STEPS = 256
"""How often requests that vLLM no longer knows are freed, where it reports no removals."""
_MAX_HITS = 64
"""Hits rows of the pool feature table; `pool_primary` saturates far below (POOL_HITS)."""
_NONE = np.zeros(0, dtype=np.int64)
ADMIT_CHUNK = 4096
"""vLLM's prefill tokens per step (`max_num_batched_tokens`) where the engine does not say: a
request's prompt is indexed while vLLM prefills it, up to where vLLM can have got by the end of
each step, so that indexing a long prompt costs each step no more than its share of what vLLM
prefills in it, and no step stalls for a whole long prompt. Whatever remains is indexed at the
first sample, where the reference drafter indexes it whole (the same index, the same chains)."""
_MASK64 = (1 << 64) - 1

StateT = TypeVar("StateT")


def _headroom(prompt_len: int, max_new_tokens: int | None) -> int:
    """Tokens of output the text index is sized for at admission, beside the prompt: what the
    request may generate, up to the prompt's length (at most twice the index the prompt needs).
    Without it a prompt that fills its tables to the load they are sized for outgrows them from
    its first tokens on: each table is rehashed in a step of its own, one after another."""
    return min(max_new_tokens or 0, prompt_len)


def padding_seed(seed: int, fill: np.ndarray) -> int:
    """The Jacobi padding's generator state: the engine's seed and the request's own padding
    tokens, so that runs are reproducible whatever vLLM's request ids are."""
    return (seed * 0x100000001B3 + zlib.crc32(fill.astype(np.int64).tobytes())) & _MASK64


class BaseDrafter(Generic[StateT]):
    """What both drafters are given and keep alike: the settings, the live requests' states by
    request id and the step cost model; `remove` releases a finished request's state."""

    def __init__(self, cfg: LookaheadConfig, num_speculative_tokens: int, max_model_len: int,
                 adaptive: bool = False,
                 step_cost_prior: tuple[float, float, float] = CPU_STEP_COST_PRIOR) -> None:
        self.cfg = cfg
        self.k = num_speculative_tokens
        self.adaptive = adaptive
        self.max_model_len = max_model_len
        self.states: dict[str, StateT] = {}
        self._cost_prior = step_cost_prior
        self.cost = CostModel(step_cost_prior)

    def remove(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self._release(state)

    def _release(self, state: StateT) -> None:
        raise NotImplementedError


@dataclasses.dataclass(eq=False)
class SlotHandle:
    """A live request's slot; a new request under the same id gets a new handle."""

    req_id: str
    slot: int
    owner: object
    namespace: str | None
    share: bool
    prompt: np.ndarray | None = None
    """The prompt as stored, until the first sample: it is being indexed (`indexed` tokens so
    far); the step sees the slot only once the prompt is whole."""
    indexed: int = 0


class AcceptanceView:
    """One row (greedy or sampled) of the compiled acceptance model (`acceptance_tables`)."""

    def __init__(self, tables: dict[str, Any], row: int) -> None:
        self._tables = tables
        self._p = tables["p"]
        self._row = row

    def p(self, feature: int) -> float:
        return float(self._p[self._row, feature])

    def table(self) -> list[float]:
        return self._p[self._row].tolist()

    @property
    def calibration(self) -> Calibration:
        return Calibration(float(self._tables["expected"][self._row]),
                           float(self._tables["realized"][self._row]))


class _ChainBuffers:
    """The step's per-row arrays, sized for `rows` rows (Python reads what the step writes)."""

    def __init__(self, rows: int, k: int) -> None:
        self.rows = rows
        self.batch = np.zeros(rows, dtype=step.BATCH_ROW)
        self.slot = self.batch["slot"]
        self.samples = self.batch["samples"]
        self.verified_base = self.batch["verified_base"]
        self.verified_start = self.batch["verified_start"]
        self.verified_end = self.batch["verified_end"]
        self.length = np.zeros(rows, dtype=np.int32)
        self.flat = np.zeros(rows * k, dtype=np.int32)
        arrays = (np.zeros((rows, k), dtype=np.int32), np.zeros((rows, k), dtype=np.int32),
                  np.zeros((rows, k), dtype=np.int32), np.zeros((rows, k), dtype=np.float64))
        self.nbytes = sum(a.nbytes for a in (*arrays, self.batch, self.length, self.flat))
        self.record = chain.new_chains(*arrays, self.length, self.flat)


class LookaheadDrafter(BaseDrafter[SlotHandle]):
    def __init__(self, cfg: LookaheadConfig, num_speculative_tokens: int, max_model_len: int,
                 adaptive: bool = False,
                 step_cost_prior: tuple[float, float, float] = CPU_STEP_COST_PRIOR,
                 prefill_chunk: int | None = None) -> None:
        super().__init__(cfg, num_speculative_tokens, max_model_len, adaptive, step_cost_prior)
        if max_model_len + num_speculative_tokens >= MAX_TEXT:
            raise LookaheadConfigError(
                f"lookahead indexes at most {MAX_TEXT - 1:,} tokens per request, but "
                f"max_model_len is {max_model_len:,}; serve this model with a smaller "
                "--max-model-len or without lookahead")
        self.prefill_chunk = prefill_chunk or ADMIT_CHUNK
        self.budget_bytes = cfg.memory_budget_mib << 20
        self._start_afresh()

    # --- set-up ---------------------------------------------------------------------------

    def _start_afresh(self) -> None:
        """No request, nothing learned: the state a new engine starts from."""
        self.states = {}
        self.cost = CostModel(self._cost_prior)
        self._stats = LookaheadStats()
        self._memory = np.zeros(1, dtype=np.int64)
        self._free: list[int] = []
        self._num_slots = 0
        self._ready: dict[str, int] = {}
        """Slot of every live request whose prompt is indexed (the step's fast path)."""
        self._steady_rows: list[str] | None = None
        """The rows of the last step whose slots came from `_ready`, while the batch buffer still
        holds those slots: the same rows again need no lookup (vLLM keeps its batch's order)."""
        self._namespaces: dict[str | None, int] = {}
        self._build_state()
        self.shared = SharedCorpus(self._state, self.cfg.shared_pool_tokens)

    def _build_state(self) -> None:
        cfg, k = self.cfg, self.k
        tables = acceptance_tables(k)
        self.acceptance = {True: AcceptanceView(tables, GREEDY),
                           False: AcceptanceView(tables, SAMPLED)}
        self._counters = np.zeros(1, dtype=KERNEL_COUNTERS)
        self._buffers = _ChainBuffers(16, k)
        self._fixed_bytes = sum(np.asarray(a).nbytes for a in tables.values()) + \
            self.cost.cells.nbytes + self._counters.nbytes
        self._state = step.new_drafter_state(
            self._chain_settings(), new_acceptance(**tables), self.cost.cells, self._counters,
            self._buffers.record, (cfg.ngram_size - 1, cfg.max_key_len, cfg.guess_set_size), k,
            self._memory)
        self._fixed_bytes += step.scratch_bytes(self._state)

    def _chain_settings(self) -> chain.ChainSettings:
        """The limits and the primary feature of every kind of evidence, from the acceptance
        model's own functions."""
        cfg, k = self.cfg, self.k
        cont_len, mkl = cfg.ngram_size - 1, cfg.max_key_len
        copy = np.array([[[copy_primary(shared, order, consistent) for consistent in (False, True)]
                          for order in ORDERS] for shared in (False, True)], dtype=np.int64)
        assert POOL_HITS <= _MAX_HITS
        pool = np.array([[[pool_primary(max(key_len, 1), max(hits, 1), j) for j in range(cont_len)]
                          for hits in range(_MAX_HITS + 1)] for key_len in range(mkl + 1)],
                        dtype=np.int64)
        jacobi = np.array([jacobi_primary(pos) for pos in range(k + 1)], dtype=np.int64)
        return chain.new_settings(self.max_model_len, self.adaptive, SUPPORT_LEVELS,
                                  FILL_FEATURE, copy, pool, jacobi)

    def _grow_batch(self, rows: int) -> None:
        self._buffers = _ChainBuffers(rows, self.k)
        step.set_chains(self._state, self._buffers.record)
        self._steady_rows = None

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        self._num_slots += 1
        return self._num_slots - 1

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) every kernel with a tiny batch, so that the
        first engine step does not wait for it, then start afresh: nothing of the warm-up
        request reaches a real request's drafts."""
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
        self._start_afresh()

    # --- the step ---------------------------------------------------------------------------

    def draft_batch(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                    num_tokens: np.ndarray, token_ids: np.ndarray,
                    trajectory: StepTrajectory | None, requests: RequestSource,
                    step_seconds: float | None = None) -> list[list[int]]:
        """The next chain of every row. `step_seconds`, the wall time of the step just verified,
        teaches the cost model."""
        self._stats.steps += 1
        batch = len(req_ids)
        if batch > self._buffers.rows:
            self._grow_batch(max(batch, 2 * self._buffers.rows))
        buffers = self._buffers
        admitted, every_row = self._slots_of(req_ids, sampled, token_ids, requests, buffers)
        drafts, predictions = self._verified_rows(req_ids, trajectory, buffers)
        # The step time counts only for steps that verified nothing but these chains.
        observe = step_seconds is not None and not admitted and every_row
        total = step.step(self._state, buffers.batch[:batch], token_ids, num_tokens, drafts,
                          predictions, step_seconds if observe else -1.0)
        chains = self._chains(batch, total)
        if self._stats.steps % SWEEP_EVERY_STEPS == 0:
            self._sweep(requests)
        self._enforce_budget()
        return chains

    def _chains(self, batch: int, total: int) -> list[list[int]]:
        """The chains as the lists vLLM wants, from the step's end-to-end copy of them."""
        if not total:
            return [[] for _ in range(batch)]
        flat = self._buffers.flat[:total].tolist()
        if batch == 1:
            return [flat]
        chains = []
        start = 0
        for n in self._buffers.length[:batch].tolist():
            chains.append(flat[start:start + n])
            start += n
        return chains

    def _slots_of(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                  token_ids: np.ndarray, requests: RequestSource, buffers: _ChainBuffers,
                  ) -> tuple[bool, bool]:
        """Each row's slot (-1: nothing committed this step) and sample count into the batch
        buffer, admitting new requests; returns whether a prompt was completed (a request's
        first sample, where the reference admits it) and whether every row has a slot. In the
        steady state (every row known, indexed and sampled) without a loop over the rows."""
        batch = len(req_ids)
        if req_ids != self._steady_rows:  # else the buffer holds these rows' slots already
            slots = list(map(self._ready.get, req_ids))
            if None in slots:
                return self._slots_of_each(req_ids, sampled, token_ids, requests, buffers)
            buffers.slot[:batch] = slots
            self._steady_rows = list(req_ids)
        if not (all(sampled) and self._owners_current(req_ids, requests)):
            return self._slots_of_each(req_ids, sampled, token_ids, requests, buffers)
        buffers.samples[:batch] = list(map(len, sampled))
        return False, True

    def _owners_current(self, req_ids: Sequence[str], requests: RequestSource) -> bool:
        """Whether every row's request is the one its state was made for, not another under the
        same id (nothing to check where the engine reports every removal)."""
        if requests.reports_removals:
            return True
        states = self.states
        return all(map(operator.is_, map(requests.owner, req_ids),
                       (states[req_id].owner for req_id in req_ids)))

    def _slots_of_each(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                       token_ids: np.ndarray, requests: RequestSource, buffers: _ChainBuffers,
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
                    self._stats.prompt_tokens_indexed_in_prefill += handle.indexed - before
                slots.append(-1)
                continue
            if handle.prompt is not None:
                self._index_prompt(handle, len(handle.prompt))
                handle.prompt = None
                self._ready[req_id] = handle.slot
                admitted = True
            slots.append(handle.slot)
        batch = len(req_ids)
        buffers.slot[:batch] = slots
        buffers.samples[:batch] = [len(sample) for sample in sampled]
        return admitted, -1 not in slots

    def _verified_rows(self, req_ids: Sequence[str], trajectory: StepTrajectory | None,
                       buffers: _ChainBuffers) -> tuple[np.ndarray, np.ndarray]:
        """Where each row's verified chain is in the trajectory's flat arrays (an empty range:
        none), into the batch buffer; returns the flat drafts and predictions."""
        batch = len(req_ids)
        if trajectory is None:
            buffers.verified_end[:batch] = buffers.verified_start[:batch]
            return _NONE, _NONE
        cu = np.asarray(trajectory.cu_drafts, dtype=np.int64)
        if cu.item(-1) == cu.item(0):  # no row has drafts
            buffers.verified_end[:batch] = buffers.verified_start[:batch]
            return _NONE, _NONE
        bases = np.asarray(trajectory.bases, dtype=np.int64)
        if trajectory.req_ids == req_ids or list(trajectory.req_ids) == list(req_ids):
            buffers.verified_base[:batch] = bases
            buffers.verified_start[:batch] = cu[:-1]
            buffers.verified_end[:batch] = cu[1:]
        else:
            where = {rid: i for i, rid in enumerate(trajectory.req_ids)}
            index = np.array([where.get(rid, -1) for rid in req_ids], dtype=np.int64)
            known = index >= 0
            buffers.verified_base[:batch] = np.where(known, bases[index], 0)
            buffers.verified_start[:batch] = np.where(known, cu[index], 0)
            buffers.verified_end[:batch] = np.where(known, cu[index + 1], 0)
        drafts, predictions = trajectory.arrays()
        return (np.ascontiguousarray(drafts, dtype=np.int64),
                np.ascontiguousarray(predictions, dtype=np.int64))

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
        admission = np.zeros(1, dtype=step.ADMISSION)
        admission["num_prompt"] = num_prompt
        admission["last_token"] = int(tokens[num_prompt - 1])
        admission["budget"] = info.options.chain_budget(self.k)
        admission["stops_masked_until"] = info.stops_masked_until
        namespace = self._namespace_id(info.options.namespace) if share else NO_NAMESPACE
        # A seeded request drafts from its own tokens only: by the prior, from no corpus, kept
        # whole by the cut (its output may still join the corpus for other requests).
        admission["acceptance_row"] = PRIOR if info.seeded else GREEDY if info.greedy \
            else SAMPLED
        admission["namespace"] = NO_NAMESPACE if info.seeded else namespace
        admission["independent"] = info.seeded
        admission["seed"] = padding_seed(self.cfg.seed, real)
        admission["reserve"] = len(prompt) + _headroom(len(prompt), info.max_new_tokens)
        if not self.cfg.pool_from_prompt:
            # Never copied from (LADE's POOL_FROM_PROMPT off); placeholders keep positions aligned.
            prompt[:] = -1
        slot = self._new_slot()
        step.admit(self._state, slot, admission, fill.astype(np.int32), stops.astype(np.int32))
        handle = SlotHandle(req_id, slot, info.owner, info.options.namespace, share, prompt)
        self.states[req_id] = handle
        return handle

    def _index_prompt(self, handle: SlotHandle, upto: int) -> None:
        """Extend the slot's text with its prompt up to `upto` tokens."""
        assert handle.prompt is not None
        upto = min(upto, len(handle.prompt))
        if upto > handle.indexed:
            step.index_prompt(self._state, handle.slot, handle.prompt[handle.indexed:upto])
            handle.indexed = upto
            self._enforce_budget()

    def _namespace_id(self, namespace: str | None) -> int:
        nsid = self._namespaces.setdefault(namespace, len(self._namespaces))
        step.corpus(self._state, nsid)  # made (empty) on first use
        return nsid

    def _release(self, handle: SlotHandle) -> None:
        """A finished request's output joins its namespace's shared corpus; its slot is freed."""
        self._ready.pop(handle.req_id, None)
        self._steady_rows = None
        if handle.share:
            output = step.finished_output(self._state, handle.slot)
            self.shared.add(self._namespaces[handle.namespace], output)
        step.release(self._state, handle.slot)
        self._free.append(handle.slot)

    def _sweep(self, requests: RequestSource) -> None:
        """Free states vLLM no longer knows, for versions without a removal hook."""
        for req_id in [r for r, h in self.states.items() if requests.owner(r) is not h.owner]:
            self.remove(req_id)

    # --- memory -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held: every array of the compiled state, the step's buffers, the shared
        corpus's retained sequences and the model tables."""
        return int(self._memory[0]) + self._fixed_bytes + self._buffers.nbytes + \
            self.shared.sequence_bytes

    def _enforce_budget(self) -> None:
        if self.nbytes() <= self.budget_bytes:
            return
        self._stats.memory_evictions += 1
        self.shared.evict_until(lambda: self.nbytes() <= self.budget_bytes)
        live = [h.slot for h in self.states.values()]
        evictions: tuple[tuple[Callable[..., int], Callable[..., None]], ...] = (
            (step.pool_bytes, step.clear_pool), (step.text_bytes, step.evict_text))
        for region_bytes, clear in evictions:
            for slot in sorted(live, key=lambda s: region_bytes(self._state, s), reverse=True):
                if self.nbytes() <= self.budget_bytes or region_bytes(self._state, slot) == 0:
                    break
                clear(self._state, slot)

    # --- statistics -------------------------------------------------------------------------

    @property
    def stats(self) -> LookaheadStats:
        """The counters, brought up to date from the step's record on every read."""
        read_kernel_counters(self._counters, self._stats)
        return self._stats

    def snapshot(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["config"] = self.cfg.to_dict()
        d["num_speculative_tokens"] = self.k
        d["adaptive"] = self.adaptive
        d["live_requests"] = len(self.states)
        slots = np.array([h.slot for h in self.states.values()], dtype=np.int64)
        d["pool_keys"], d["pool_continuations"] = step.pool_sizes(self._state, slots)
        d["pool_bytes"] = self.nbytes()
        d["memory_budget_bytes"] = self.budget_bytes
        d["shared_tokens"] = len(self.shared)
        d["token_cost_s"] = self.cost.token_cost
        d["step_cost_fit"] = self.cost.theta.tolist()
        d["greedy_calibration"] = self.acceptance[True].calibration.factor()
        d["sampled_calibration"] = self.acceptance[False].calibration.factor()
        return d
