"""The drafter: everything lookahead does per step that needs no vLLM, testable with plain arrays.

Per request it keeps a Jacobi window and an n-gram pool, keyed by request id; per step it takes the
committed tokens and the verified chains with the target's predictions (`StepTrajectory`), updates
the state and composes the next chains.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vllm_lookahead.config import LookaheadConfig, RequestOptions
from vllm_lookahead.jacobi_window import JacobiWindow
from vllm_lookahead.ngram_cache import NGramPool, Origin
from vllm_lookahead.trajectory import StepTrajectory

_SWEEP_EVERY_STEPS = 256


class Source(enum.IntEnum):
    """What filled a stretch of the chain; acceptance is counted per source."""

    CANDIDATE_PROMPT = Origin.PROMPT
    CANDIDATE_OUTPUT = Origin.OUTPUT
    CANDIDATE_TRAJECTORY = Origin.TRAJECTORY
    JACOBI = 3
    CHAINED = 4
    FILL = 5


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    owner: object
    """vLLM's state object for the request; another object under the same id is a new request."""
    num_prompt_tokens: int
    stop_token_ids: frozenset[int]
    options: RequestOptions = dataclasses.field(default_factory=RequestOptions)
    """The request's lookahead options (`extra_args`), validated in the front-end."""


class RequestSource(Protocol):
    def owner(self, req_id: str) -> object | None: ...

    def info(self, row: int, req_id: str) -> RequestInfo: ...


@dataclasses.dataclass
class LookaheadStats:
    steps: int = 0
    chains: int = 0
    draft_tokens: int = 0
    verified_chains: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    drafted_by_source: list[int] = dataclasses.field(default_factory=lambda: [0] * len(Source))
    accepted_by_source: list[int] = dataclasses.field(default_factory=lambda: [0] * len(Source))
    trajectory_ngrams: int = 0
    resyncs: int = 0
    propose_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drafted_by_source"] = dict(zip([s.name.lower() for s in Source],
                                          self.drafted_by_source, strict=True))
        d["accepted_by_source"] = dict(zip([s.name.lower() for s in Source],
                                           self.accepted_by_source, strict=True))
        return d


class RequestState:
    def __init__(self, cfg: LookaheadConfig, info: RequestInfo, prompt: np.ndarray,
                 chain_len: int) -> None:
        self.owner = info.owner
        self.pool = NGramPool(cfg.ngram_size, cfg.guess_set_size, cfg.max_key_len)
        self.window = JacobiWindow(cfg.ngram_size, cfg.max_key_len, cfg.seed, prompt,
                                   info.stop_token_ids)
        self.num_committed = -1
        self.last_token = -1
        self.layout: list[tuple[int, Source]] = []
        self.chain_len = chain_len


class LookaheadDrafter:
    """Everything the proposer does that needs no vLLM: testable with plain arrays."""

    def __init__(self, cfg: LookaheadConfig, num_speculative_tokens: int,
                 max_model_len: int, adaptive: bool = False) -> None:
        self.cfg = cfg
        self.k = num_speculative_tokens
        self.adaptive = adaptive
        self.max_model_len = max_model_len
        self.states: dict[str, RequestState] = {}
        self.stats = LookaheadStats()

    def draft_batch(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                    num_tokens: np.ndarray, token_ids: np.ndarray,
                    trajectory: StepTrajectory | None,
                    requests: RequestSource) -> list[list[int]]:
        self.stats.steps += 1
        drafts: list[list[int]] = []
        for row, req_id in enumerate(req_ids):
            if not sampled[row]:
                # A partial prefill chunk or a discarded sample: nothing was committed.
                drafts.append([])
                continue
            state = self._state_for(row, req_id, token_ids[row], requests)
            length = int(num_tokens[row])
            traj_row = trajectory.row(req_id) if trajectory is not None else None
            self._sync(state, token_ids[row], length, len(sampled[row]), traj_row)
            drafts.append(self._compose(state, token_ids[row], length).tolist())
        if self.stats.steps % _SWEEP_EVERY_STEPS == 0:
            self._sweep(requests)
        return drafts

    def remove(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def _state_for(self, row: int, req_id: str, tokens: np.ndarray,
                   requests: RequestSource) -> RequestState:
        state = self.states.get(req_id)
        if state is None or requests.owner(req_id) is not state.owner:
            info = requests.info(row, req_id)
            state = RequestState(self.cfg, info, tokens[:info.num_prompt_tokens], self.k)
            if self.cfg.pool_from_prompt:
                state.pool.add_sequence(tokens[:info.num_prompt_tokens], 0, Origin.PROMPT)
            state.num_committed = info.num_prompt_tokens
            state.last_token = int(tokens[info.num_prompt_tokens - 1])
            self.states[req_id] = state
        return state

    def _sync(self, state: RequestState, tokens: np.ndarray, length: int, num_sampled: int,
              traj_row: tuple[int, np.ndarray, np.ndarray] | None) -> None:
        """Bring the state to `length` committed tokens; `tokens` is the source of truth."""
        prev = state.num_committed
        if length < prev or int(tokens[prev - 1]) != state.last_token:
            # vLLM discarded output (rollback); the guesses refer to tokens that are gone.
            self.stats.resyncs += 1
            state.window.reset()
            prev = min(prev, length)
        elif traj_row is not None and self._is_this_step(tokens, prev, length, num_sampled,
                                                         traj_row):
            base, drafts, argmax = traj_row
            accepted = num_sampled - 1
            self._count_acceptance(state, len(drafts), accepted)
            self._adapt_chain_len(state, len(drafts), accepted)
            harvest = state.window.observe(tokens, base, drafts, argmax, accepted)
            state.pool.add(harvest.seq, harvest.starts, harvest.conts, Origin.TRAJECTORY)
            self.stats.trajectory_ngrams += len(harvest.starts)
        elif length != prev + num_sampled:
            self.stats.resyncs += 1  # steps were skipped; the committed tokens fill the gap
        lo = max(0, prev - self.cfg.ngram_size + 1 - (self.cfg.max_key_len - 1))
        state.pool.add_sequence(tokens[lo:length], prev - self.cfg.ngram_size + 1 - lo,
                                Origin.OUTPUT)
        state.num_committed = length
        state.last_token = int(tokens[length - 1])

    @staticmethod
    def _is_this_step(tokens: np.ndarray, prev: int, length: int, num_sampled: int,
                      traj_row: tuple[int, np.ndarray, np.ndarray]) -> bool:
        base, drafts, _ = traj_row
        accepted = num_sampled - 1
        return (base == prev and length == base + num_sampled and accepted <= len(drafts)
                and np.array_equal(tokens[base:base + accepted], drafts[:accepted]))

    def _count_acceptance(self, state: RequestState, num_verified: int, accepted: int) -> None:
        self.stats.verified_chains += 1
        self.stats.verified_tokens += num_verified
        self.stats.accepted_tokens += accepted
        remaining = accepted
        for size, source in state.layout:
            take = min(size, remaining)
            self.stats.accepted_by_source[source] += take
            remaining -= take
            if remaining == 0:
                break

    def _adapt_chain_len(self, state: RequestState, num_verified: int, accepted: int) -> None:
        if not self.adaptive:
            return
        if accepted < num_verified:
            state.chain_len = accepted + 1
        else:
            state.chain_len = min(self.k, 2 * max(num_verified, 1))

    def _compose(self, state: RequestState, tokens: np.ndarray, length: int) -> np.ndarray:
        """The chain: the best pool candidate for the context, chained candidates for its tail,
        the Jacobi guesses for the positions after them, then seeded prompt tokens; at most K
        tokens and never past max_model_len."""
        budget = min(self.k, state.chain_len, self.max_model_len - length - 1)
        state.layout = []
        if budget <= 0:
            return np.empty(0, dtype=np.int64)
        keylen = self.cfg.max_key_len
        tail = tokens[max(0, length - keylen):length].astype(np.int64)
        parts: list[np.ndarray] = []
        n = 0

        def push(piece: np.ndarray, source: Source) -> None:
            nonlocal n
            piece = piece[:budget - n]
            if len(piece):
                parts.append(piece)
                state.layout.append((len(piece), source))
                n += len(piece)

        # Pool continuations are verified n-grams or the model's own predictions, so they beat
        # Jacobi guesses, which were made a step ago from a chain that has since been rejected.
        while n < budget and (hit := state.pool.lookup(tail)) is not None:
            piece = np.asarray(hit[0], dtype=np.int64)
            push(piece, Source(hit[1]) if n == 0 else Source.CHAINED)
            tail = np.concatenate([tail, piece])[-keylen:]
        push(state.window.issue(length + n, n, budget - n), Source.JACOBI)
        push(state.window.random_fill(budget - n), Source.FILL)
        self.stats.chains += 1
        self.stats.draft_tokens += n
        for size, source in state.layout:
            self.stats.drafted_by_source[source] += size
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _sweep(self, requests: RequestSource) -> None:
        """Free states vLLM no longer knows, for versions without a removal hook."""
        for req_id in [r for r, s in self.states.items() if requests.owner(r) is not s.owner]:
            del self.states[req_id]

    def snapshot(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["config"] = self.cfg.to_dict()
        d["num_speculative_tokens"] = self.k
        d["adaptive"] = self.adaptive
        d["live_requests"] = len(self.states)
        d["pool_continuations"] = sum(len(s.pool) for s in self.states.values())
        d["pool_keys"] = sum(s.pool.num_keys for s in self.states.values())
        return d
