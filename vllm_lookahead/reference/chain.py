"""Chains and the cost cut, in plain Python: the specification of `vllm_lookahead.chain`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vllm_lookahead.counters import Source
from vllm_lookahead.step_cost import CostModel


@dataclasses.dataclass
class Chain:
    """A chain being composed: tokens with, per token, its source, its acceptance feature and the
    probability that the chain is accepted up to and including it."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    sources: list[Source] = dataclasses.field(default_factory=list)
    features: list[int] = dataclasses.field(default_factory=list)
    reach: list[float] = dataclasses.field(default_factory=list)

    def push(self, token: int, source: Source, feature: int, p: float) -> None:
        self.reach.append((self.reach[-1] if self.reach else 1.0) * p)
        self.tokens.append(token)
        self.sources.append(source)
        self.features.append(feature)

    def cut(self, n: int) -> None:
        del self.tokens[n:], self.sources[n:], self.features[n:], self.reach[n:]



def cut_chains(probs: Sequence[Sequence[float]], cost: CostModel,
               independent: Sequence[bool] | None = None) -> list[int]:
    """How many leading draft tokens of each chain to keep.

    `probs[r][i]` is the probability that chain r's first i+1 tokens are all accepted
    (non-increasing in i). Tokens are taken in decreasing order of that probability while each
    raises the batch's expected tokens per second, given `cost`; a chain's prefix is kept whole.
    An independent chain (a seeded request's) is kept whole and counted as verified first.
    """
    rows = len(probs)
    independent = independent or [False] * rows
    keep = [len(qs) if fixed else 0 for qs, fixed in zip(probs, independent, strict=True)]
    if rows == 0:
        return keep
    expected = float(rows)
    step_cost = cost.predict(rows, rows)
    token_cost = cost.token_cost
    for r in range(rows - 1, -1, -1):
        if independent[r]:
            for q in probs[r]:
                expected += q
                step_cost += token_cost
    order = sorted(((q, r) for r, qs in enumerate(probs) if not independent[r] for q in qs),
                   reverse=True)
    for q, r in order:
        if q * step_cost <= token_cost * expected:
            break
        keep[r] += 1
        expected += q
        step_cost += token_cost
    return keep
