"""A simulated engine for the drafter: a deterministic next-token function stands in for the model
and vLLM's greedy verification rule is applied, with batch rows shuffled every step unless asked
not to (the worst case for anything that follows rows; vLLM's persistent batch moves rows only as
requests arrive and leave). No vLLM; used by the tests and by `benchmarks.proposer_cost`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vllm_lookahead.config import LookaheadConfig, RequestOptions
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.trajectory import Requests, StepTrajectory

NextToken = Callable[[Sequence[int]], int]


class SimulatedEngine:
    """Requests `req-0, req-1, ...` with the given prompts, decoded greedily by `model`. With a
    `prefill_chunk`, a prompt is prefilled that many tokens per step, as vLLM's chunked prefill
    does: a request's rows sample nothing until its last chunk. `shuffle_rows=False` keeps the
    rows in the order `step` is given them, as vLLM's persistent batch does between arrivals
    and departures."""

    def __init__(self, cfg: LookaheadConfig, k: int, prompts: Sequence[Sequence[int]],
                 model: NextToken, seed: int = 0, adaptive: bool = False,
                 max_len: int = 256,
                 drafter: Callable[..., Any] = LookaheadDrafter,
                 prefill_chunk: int | None = None, shuffle_rows: bool = True) -> None:
        self.model = model
        self.shuffle_rows = shuffle_rows
        self.prefill_chunk = prefill_chunk
        self._prefill_steps: dict[str, int] = {}
        self.max_len = max_len
        self.drafter = drafter(cfg, k, max_len, adaptive)
        self.requests = Requests(reports_removals=True)  # `finish` removes from both
        self.rng = random.Random(seed)
        self.tokens: dict[str, list[int]] = {}
        self.drafts: dict[str, list[int]] = {}
        for p in prompts:
            self.add(p)

    def add(self, prompt: Sequence[int], options: RequestOptions | None = None,
            prompt_mask: Sequence[bool] | None = None, greedy: bool = True,
            stop_token_ids: frozenset[int] = frozenset(),
            max_new_tokens: int | None = None, seeded: bool = False,
            min_tokens: int = 0) -> str:
        """A new request `req-<n>`; it joins the batch at the next `run`."""
        rid = f"req-{len(self.tokens)}"
        self.requests.add(rid, len(prompt), options, prompt_mask, greedy, stop_token_ids,
                          max_new_tokens, seeded, min_tokens)
        self.tokens[rid] = list(prompt)
        self.drafts[rid] = []
        if self.prefill_chunk is not None:
            self._prefill_steps[rid] = 0
        return rid

    def finish(self, rid: str) -> None:
        """The request ends, as vLLM removes it: the drafter frees (and may share) its state."""
        self.requests.remove(rid)
        self._prefill_steps.pop(rid, None)
        self.drafter.remove(rid)
        self.drafts[rid] = []

    def step(self, rids: list[str], propose: bool = True) -> None:
        """Verify each request's drafts greedily, commit, then ask for new drafts."""
        if self.shuffle_rows:
            self.rng.shuffle(rids)
        bases, flat_d, flat_y, cu, sampled = [], [], [], [0], []
        for rid in rids:
            toks, d = self.tokens[rid], self.drafts[rid]
            if self._prefills(rid):
                bases.append(len(toks))
                cu.append(cu[-1])
                sampled.append([])
                continue
            y = [self.model(toks + d[:j]) for j in range(len(d) + 1)]
            a = next((j for j in range(len(d)) if d[j] != y[j]), len(d))
            bases.append(len(toks))
            flat_d += d
            flat_y += y[:len(d)]
            cu.append(cu[-1] + len(d))
            sampled.append([*d[:a], y[a]])
            toks.extend([*d[:a], y[a]])
        if not propose:
            for rid in rids:
                self.drafts[rid] = []
            return
        # As vLLM's runner hands them over: arrays made by the engine, not by the drafter.
        arrays = (np.array(flat_d, dtype=np.int64), np.array(flat_y, dtype=np.int64))
        traj = StepTrajectory(list(rids), np.array(bases), np.array(cu), lambda: arrays)
        token_ids = np.zeros((len(rids), self.max_len), dtype=np.int32)
        for row, rid in enumerate(rids):
            token_ids[row, :len(self.tokens[rid])] = self.tokens[rid]
        num_tokens = np.array([len(self.tokens[r]) for r in rids], dtype=np.int32)
        out = self.drafter.draft_batch(rids, sampled, num_tokens, token_ids, traj, self.requests)
        for rid, d in zip(rids, out, strict=True):
            if not all(isinstance(t, int) for t in d):
                raise TypeError(f"drafts must be Python ints, got {d!r}")
            self.drafts[rid] = d

    def _prefills(self, rid: str) -> bool:
        """Whether this step computes one of the request's prefill chunks before its last one
        (which samples). Like vLLM, the engine then reports the tokens computed before it."""
        steps = self._prefill_steps.get(rid)
        if steps is None or self.prefill_chunk is None:
            return False
        if (steps + 1) * self.prefill_chunk >= len(self.tokens[rid]):
            del self._prefill_steps[rid]
            self.requests.computed.pop(rid, None)
            return False
        self.requests.computed[rid] = steps * self.prefill_chunk
        self._prefill_steps[rid] = steps + 1
        return True

    def run(self, new_tokens: int) -> int:
        """Decode until every live request has `new_tokens` more tokens; returns the steps."""
        rids = [r for r in self.tokens if self.requests.owner(r) is not None]
        start = {r: len(self.tokens[r]) for r in rids}
        steps = 0
        while any(len(self.tokens[r]) - start[r] < new_tokens for r in rids):
            live = [r for r in rids if len(self.tokens[r]) - start[r] < new_tokens]
            self.step(live)
            steps += 1
        return steps
