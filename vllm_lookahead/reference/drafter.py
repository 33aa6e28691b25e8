"""The reference drafter: the algorithm in plain Python, kept as the specification that the compiled
drafter (`drafter.LookaheadDrafter` and its kernels) must reproduce chain for chain.

Per request (keyed by request id) it keeps the request's text indexed for longest-suffix matches,
the Jacobi window and the pool of trajectory n-grams; per engine, the acceptance model, the step
cost model and the corpora shared across requests. Each step it takes the committed tokens and the
verified chains with the target's predictions (`StepTrajectory`), learns from them, and composes
the next chains:

1. **Candidates, token by token.** At each chain position the sources bid: the request's own
   text (prompt and output) and the shared corpus, each with the token after the longest earlier
   occurrence of the context's end; the trajectory pool, with every continuation stored under the
   context's last tokens (up to G per key). Each bid is priced by the acceptance model from its
   evidence, and the likeliest wins; a pool n-gram is taken whole, since its tokens were predicted
   one after another.
2. **Jacobi guesses** then fill the positions for which no source bids, and seeded prompt tokens
   (LADE's window start) the rest, up to K.
3. **The cut.** With `adaptive` on (the CPU default), the batch keeps only the draft tokens whose
   probability of being reached and accepted pays for verifying them (`reference.chain.cut_chains`);
   composing stops once a token's reach is below what the cut could ever keep.
   Off (GPUs), every chain is K tokens, so that CUDA graphs cover the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vllm_lookahead.acceptance import (
    FILL_FEATURE,
    AcceptanceModel,
    Calibration,
    calibrated,
    calibration,
    copy_primary,
    feature,
    jacobi_primary,
    pool_primary,
)
from vllm_lookahead.chain import INDEPENDENT_REACH_FLOOR, chain_limit
from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.counters import LookaheadStats, Source
from vllm_lookahead.drafter import SWEEP_EVERY_STEPS, BaseDrafter
from vllm_lookahead.reference.chain import Chain, cut_chains
from vllm_lookahead.reference.context_index import ContextIndex, SharedCorpus
from vllm_lookahead.reference.jacobi_window import JacobiWindow
from vllm_lookahead.reference.ngram_cache import Candidate, NGramPool
from vllm_lookahead.step_cost import CPU_STEP_COST_PRIOR
from vllm_lookahead.trajectory import RequestInfo, RequestSource, StepTrajectory

_CONTEXT = 16
"""Tokens of context the sources look at (the longest match order)."""
# Kinds of source, as bits: a token's support is how many kinds propose it.
_OWN, _SHARED, _POOL, _JACOBI = 1, 2, 4, 8
_KINDS = [bin(kinds).count("1") for kinds in range(16)]


class RequestState:
    def __init__(self, cfg: LookaheadConfig, info: RequestInfo, prompt: list[int],
                 fill: np.ndarray, budget: int, acceptance: AcceptanceModel) -> None:
        self.owner = info.owner
        self.num_prompt_tokens = info.num_prompt_tokens
        self.budget = budget
        self.stops_masked_until = info.stops_masked_until
        self.acceptance = acceptance
        self.namespace = info.options.namespace
        self.share = info.options.share and cfg.shared_pool_tokens > 0
        self.independent = info.seeded
        """Drafts from its own tokens only (no corpus, the prior, kept whole by the cut)."""
        self.prompt = prompt
        """The prompt as drafts may copy it: -1 where there is no real token (or nothing, when
        `pool_from_prompt` is off)."""
        self.text = ContextIndex()
        self.pool = NGramPool(cfg.ngram_size, cfg.guess_set_size, cfg.max_key_len)
        self.window = JacobiWindow(cfg.ngram_size, cfg.max_key_len, cfg.seed, fill,
                                   info.stop_token_ids)
        self.num_committed = -1
        self.last_token = -1
        self.issued = Chain()
        self.calibration = Calibration()

    def calibration_factor(self) -> float:
        """What its reach is priced with (`acceptance.calibration`)."""
        if self.independent:
            return 1.0
        engine = self.acceptance.calibration
        return calibration(engine.expected, engine.realized, self.calibration.expected,
                           self.calibration.realized)


class ReferenceDrafter(BaseDrafter[RequestState]):
    def __init__(self, cfg: LookaheadConfig, num_speculative_tokens: int, max_model_len: int,
                 adaptive: bool = False,
                 step_cost_prior: tuple[float, float, float] = CPU_STEP_COST_PRIOR) -> None:
        super().__init__(cfg, num_speculative_tokens, max_model_len, adaptive, step_cost_prior)
        self.stats = LookaheadStats()
        # Sampled requests accept a draft with the target's probability of it, not its argmax:
        # they learn their own acceptance.
        self.acceptance = {True: AcceptanceModel(), False: AcceptanceModel()}
        self.prior = AcceptanceModel()
        """What seeded requests draft by: never taught anything."""
        self.shared = SharedCorpus(cfg.shared_pool_tokens)

    def draft_batch(self, req_ids: Sequence[str], sampled: Sequence[Sequence[int]],
                    num_tokens: np.ndarray, token_ids: np.ndarray,
                    trajectory: StepTrajectory | None, requests: RequestSource,
                    step_seconds: float | None = None) -> list[list[int]]:
        """The next chain of every row. `step_seconds`, the wall time of the step just verified,
        teaches the cost model."""
        self.stats.steps += 1
        # Three phases, each over the whole batch in row order: admit new requests, learn from
        # every verified chain, then compose. Learning first lets every chain use all of this
        # step's outcomes, and keeps the composition of one row independent of the others.
        states: list[RequestState | None] = []
        admitted = False
        for row, req_id in enumerate(req_ids):
            if not sampled[row]:
                # A partial prefill chunk or a discarded sample: nothing was committed.
                states.append(None)
                continue
            state = self.states.get(req_id)
            if state is None or requests.owner(req_id) is not state.owner:
                state = self._admit(row, req_id, token_ids[row], requests)
                admitted = True
            states.append(state)
        verified = 0
        for row, state in enumerate(states):
            if state is not None:
                traj_row = trajectory.row(req_ids[row]) if trajectory is not None else None
                verified += self._sync(state, token_ids[row], int(num_tokens[row]),
                                       len(sampled[row]), traj_row)
        rows = sum(1 for state in states if state is not None)
        if step_seconds is not None and rows == len(req_ids) and not admitted:
            # Only steps that verified nothing but these chains: a prefill would skew the fit.
            self.cost.observe(rows, rows + verified, step_seconds)
        floor = self.cost.reach_floor(rows) if self.adaptive else 0.0
        own_floor = INDEPENDENT_REACH_FLOOR if self.adaptive else 0.0
        chains = [None if state is None else self._compose(
            state, token_ids[row], int(num_tokens[row]), own_floor if state.independent else floor)
            for row, state in enumerate(states)]
        self._cut([c for c in chains if c is not None],
                  [state.independent for state in states if state is not None])
        drafts = []
        for req_id, chain in zip(req_ids, chains, strict=True):
            if chain is None:
                drafts.append([])
                continue
            self._issue(self.states[req_id], chain)
            drafts.append(chain.tokens)
        if self.stats.steps % SWEEP_EVERY_STEPS == 0:
            self._sweep(requests)
        return drafts

    def _release(self, state: RequestState) -> None:
        """A finished request's output joins its namespace's shared corpus."""
        if state.share:
            self.shared.add(state.namespace, state.text.tokens[state.num_prompt_tokens:])

    def _admit(self, row: int, req_id: str, tokens: np.ndarray,
               requests: RequestSource) -> RequestState:
        old = self.states.pop(req_id, None)
        if old is not None:
            self._release(old)
        info = requests.info(row, req_id)
        prompt = tokens[:info.num_prompt_tokens].tolist()
        if info.prompt_mask is not None:
            prompt = [t if real else -1 for t, real in zip(prompt, info.prompt_mask, strict=True)]
        # The Jacobi window starts from real prompt tokens (LADE's padding), whatever the pool.
        fill = np.array([t for t in prompt if t >= 0], dtype=np.int64)
        if not self.cfg.pool_from_prompt:
            # Never copied from (LADE's POOL_FROM_PROMPT off); placeholders keep positions aligned.
            prompt = [-1] * len(prompt)
        acceptance = self.prior if info.seeded else self.acceptance[info.greedy]
        state = RequestState(self.cfg, info, prompt, fill, info.options.chain_budget(self.k),
                             acceptance)
        state.text.extend(prompt)
        state.num_committed = info.num_prompt_tokens
        state.last_token = int(tokens[info.num_prompt_tokens - 1])
        self.states[req_id] = state
        return state

    def _sync(self, state: RequestState, tokens: np.ndarray, length: int, num_sampled: int,
              traj_row: tuple[int, np.ndarray, np.ndarray] | None) -> int:
        """Bring the state to `length` committed tokens (`tokens` is the source of truth) and
        learn from the chain verified this step; returns the drafts that were verified."""
        prev = state.num_committed
        verified = 0
        if length < prev or int(tokens[prev - 1]) != state.last_token:
            # vLLM discarded output (rollback); the guesses refer to tokens that are gone.
            self.stats.resyncs += 1
            state.window.reset()
            self._rebuild_text(state, tokens, length)
        else:
            if traj_row is not None and self._is_this_step(tokens, prev, length, num_sampled,
                                                           traj_row):
                base, drafts, argmax = traj_row
                verified = len(drafts)
                self._learn(state, verified, num_sampled - 1)
                harvest = state.window.observe(tokens, base, drafts, argmax, num_sampled - 1)
                state.pool.add(harvest.seq, harvest.starts, harvest.conts)
                self.stats.trajectory_ngrams += len(harvest.starts)
            elif length != prev + num_sampled:
                self.stats.resyncs += 1  # steps were skipped; the committed tokens fill the gap
            state.text.extend(tokens[prev:length].tolist())
        state.issued = Chain()
        state.num_committed = length
        state.last_token = int(tokens[length - 1])
        return verified

    @staticmethod
    def _rebuild_text(state: RequestState, tokens: np.ndarray, length: int) -> None:
        state.text = ContextIndex()
        state.text.extend(state.prompt[:length])
        state.text.extend(tokens[len(state.text):length].tolist())

    @staticmethod
    def _is_this_step(tokens: np.ndarray, prev: int, length: int, num_sampled: int,
                      traj_row: tuple[int, np.ndarray, np.ndarray]) -> bool:
        base, drafts, _ = traj_row
        accepted = num_sampled - 1
        return (base == prev and length == base + num_sampled and accepted <= len(drafts)
                and np.array_equal(tokens[base:base + accepted], drafts[:accepted]))

    def _learn(self, state: RequestState, verified: int, accepted: int) -> None:
        issued = state.issued
        self.stats.verified_chains += 1
        self.stats.verified_tokens += verified
        self.stats.accepted_tokens += accepted
        for source in issued.sources[:accepted]:
            self.stats.accepted_by_source[source] += 1
        if not state.independent:
            state.calibration.add(state.acceptance.observe(issued.features[:verified], accepted))

    def _compose(self, state: RequestState, tokens: np.ndarray, length: int,
                 floor: float = 0.0) -> Chain:
        """The longest chain worth considering (`_cut` shortens it): at each position the token
        with the best-priced bid, then seeded prompt tokens once nobody bids; at most K tokens,
        never past max_model_len, and no further than the first token whose reach is below
        `floor`, since the cut keeps no token below it (`CostModel.reach_floor`)."""
        budget = chain_limit(state.budget, self.max_model_len, state.stops_masked_until, length)
        chain = Chain()
        if budget <= 0:
            return chain
        context = tokens[max(0, length - _CONTEXT):length].tolist()
        guesses = state.window.guesses_from(length).tolist()
        shared = self.shared.index(state.namespace) if state.share and not state.independent \
            else None
        run: tuple[Candidate, int] | None = None
        factor = state.calibration_factor()
        while len(chain.tokens) < budget:
            pos = len(chain.tokens)
            bid = self._best_bid(state, shared, context, guesses[pos] if pos < len(guesses)
                                 else -1, pos, run)
            if bid is None:
                break
            p, token, source, feat, run = bid
            chain.push(token, source, feat, calibrated(p, factor))
            context.append(token)
            if chain.reach[-1] < floor:
                break
        p_fill = calibrated(state.acceptance.p(FILL_FEATURE), factor)
        for token in state.window.random_fill(self._fill_count(chain, budget, p_fill,
                                                               floor)).tolist():
            chain.push(token, Source.FILL, FILL_FEATURE, p_fill)
        state.window.issue(length, chain.tokens)
        return chain

    @staticmethod
    def _fill_count(chain: Chain, budget: int, p_fill: float, floor: float) -> int:
        """How many fill tokens follow: up to the budget, through the first below `floor`."""
        reach = chain.reach[-1] if chain.reach else 1.0
        count = 0
        while reach >= floor and len(chain.tokens) + count < budget:
            reach *= p_fill
            count += 1
        return count

    def _best_bid(self, state: RequestState, shared: ContextIndex | None, context: list[int],
                  guess: int, pos: int, run: tuple[Candidate, int] | None,
                  ) -> tuple[float, int, Source, int, tuple[Candidate, int] | None] | None:
        """Every source's next token for this context; the token whose evidence (its best
        source, and how many kinds of source agree on it) prices highest, as
        `(p, token, source, feature, pool n-gram being continued)`, or None if none bids."""
        p_of = state.acceptance.p
        offers: dict[int, list[Any]] = {}  # token -> [p alone, primary, source, kinds, run]

        def offer(token: int, kind: int, source: Source, primary: int,
                  run_after: tuple[Candidate, int] | None) -> None:
            p = p_of(feature(primary, 0))
            current = offers.get(token)
            if current is None:
                offers[token] = [p, primary, source, kind, run_after]
                return
            current[3] |= kind
            if p > current[0]:
                current[0], current[1], current[2], current[4] = p, primary, source, run_after

        match = state.text.match(context)
        if match is not None:
            token = state.text.tokens[match.end + 1]
            source = Source.PROMPT if match.end + 1 < state.num_prompt_tokens else Source.OUTPUT
            offer(token, _OWN, source, copy_primary(False, match.length, match.consistent), None)
        if shared is not None and (match := shared.match(context)) is not None:
            offer(shared.tokens[match.end + 1], _SHARED, Source.SHARED,
                  copy_primary(True, match.length, match.consistent), None)
        # A pool n-gram continues where it was chosen, since its tokens were predicted one after
        # another; fresh n-grams start under the context's last tokens.
        continued = [run] if run is not None else []
        for cand, j in [*continued, *((c, 0) for c in state.pool.candidates(context))]:
            offer(cand.tokens[j], _POOL, Source.TRAJECTORY,
                  pool_primary(cand.key_len, cand.hits, j),
                  (cand, j + 1) if j + 1 < len(cand.tokens) else None)
        if guess >= 0:
            offer(guess, _JACOBI, Source.JACOBI, jacobi_primary(pos), None)
        best = None
        for token, (_, primary, source, kinds, run_after) in offers.items():
            feat = feature(primary, _KINDS[kinds] - 1)
            p = p_of(feat)
            if best is None or p > best[0]:
                best = (p, token, source, feat, run_after)
        return best

    def _cut(self, chains: list[Chain], independent: list[bool]) -> None:
        if not self.adaptive:
            return
        keep = cut_chains([c.reach for c in chains], self.cost, independent)
        for chain, n in zip(chains, keep, strict=True):
            self.stats.cut_tokens += len(chain.tokens) - n
            chain.cut(n)

    def _issue(self, state: RequestState, chain: Chain) -> None:
        state.issued = chain
        if chain.tokens:  # a chain the cost rule cut to nothing is not a chain
            self.stats.chains += 1
        self.stats.draft_tokens += len(chain.tokens)
        for source in chain.sources:
            self.stats.drafted_by_source[source] += 1

    def _sweep(self, requests: RequestSource) -> None:
        """Free states vLLM no longer knows, for versions without a removal hook."""
        for req_id in [r for r, s in self.states.items() if requests.owner(r) is not s.owner]:
            self.remove(req_id)

    def snapshot(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["config"] = self.cfg.to_dict()
        d["num_speculative_tokens"] = self.k
        d["adaptive"] = self.adaptive
        d["live_requests"] = len(self.states)
        d["pool_continuations"] = sum(len(s.pool) for s in self.states.values())
        d["pool_keys"] = sum(s.pool.num_keys for s in self.states.values())
        d["shared_tokens"] = len(self.shared)
        d["token_cost_s"] = self.cost.token_cost
        d["step_cost_fit"] = self.cost.theta.tolist()
        d["greedy_calibration"] = self.acceptance[True].calibration.factor()
        d["sampled_calibration"] = self.acceptance[False].calibration.factor()
        return d
