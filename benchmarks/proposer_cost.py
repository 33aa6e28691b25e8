"""The lookahead drafter's own cost, without vLLM: microseconds per request per step.

Drives `LookaheadDrafter` with the simulated engine of `vllm_lookahead.simulation` (greedy
verification, batch rows shuffled every step) over a deterministic toy language with repeated
phrases, so pools fill and chains get accepted as in real traffic. Prints the time per
request-step, a digest of every chain proposed (an optimisation of the drafter must leave it
unchanged) and the pools' memory at the end.

Usage:
``python -m benchmarks.proposer_cost [--batch 8] [--tokens 400] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Sequence
from typing import Any

from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.simulation import SimulatedEngine

VOCAB = 2000
PROMPT_LEN = 300


class ToyLanguage:
    """Next token from the last two: half the contexts continue a short cycle, so phrases repeat."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._table: dict[tuple[int, int], int] = {}

    def __call__(self, tokens: Sequence[int]) -> int:
        key = (tokens[-2] if len(tokens) > 1 else 0, tokens[-1])
        if key not in self._table:
            cyclic = self._rng.random() < 0.5
            self._table[key] = (tokens[-1] * 7 + 3) % 64 if cyclic else self._rng.randrange(VOCAB)
        return self._table[key]


def run(batch: int, tokens: int) -> tuple[float, int, int, str, tuple[int, int]]:
    prompts = [[random.Random(i).randrange(64) for _ in range(PROMPT_LEN)] for i in range(batch)]
    engine = SimulatedEngine(LookaheadConfig(), 7, prompts, model=ToyLanguage(1),
                        max_len=PROMPT_LEN + tokens + 64)
    draft_batch = engine.drafter.draft_batch
    digest = hashlib.sha256()
    spent, request_steps = 0.0, 0

    def timed(*args: Any, **kwargs: Any) -> list[list[int]]:
        nonlocal spent, request_steps
        started = time.perf_counter()
        chains = draft_batch(*args, **kwargs)
        spent += time.perf_counter() - started
        request_steps += len(chains)
        digest.update(repr(chains).encode())
        return chains

    engine.drafter.draft_batch = timed  # type: ignore[method-assign]
    engine.run(tokens)
    pools = [state.pool for state in engine.drafter.states.values()]
    size = sum(len(p) for p in pools), sum(p.nbytes() for p in pools)
    return spent, request_steps, engine.drafter.stats.accepted_tokens, digest.hexdigest()[:16], size


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=400, help="new tokens per request")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    for _ in range(args.repeat):
        spent, request_steps, accepted, digest, (continuations, nbytes) = run(args.batch,
                                                                              args.tokens)
        print(f"batch {args.batch}: {1e6 * spent / request_steps:.1f} us per request-step over "
              f"{request_steps} request-steps, {accepted} tokens accepted, chains {digest}; "
              f"pools {continuations} continuations, {nbytes / 1024:.0f} KiB "
              f"({nbytes / max(continuations, 1):.0f} B each)")


if __name__ == "__main__":
    main()
