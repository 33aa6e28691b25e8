"""The drafter's cost on recorded traffic, with cold caches: `proposer_cost`'s traffic recorded
once, then replayed on fresh drafters, timing only `draft_batch`.

    python -m benchmarks.proposer_replay [--batch 256] [--repeat 5] [--cold]

Replaying fixed inputs takes the simulated engine out of the timing; `--cold` also evicts the
caches before every call (vLLM's forward does as much between two proposer calls). A variant of
the package (an intrinsic turned off, say) is compared by running this from each checkout in
turn: the recording is kept under `--traffic` and read back by every variant.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import proposer_cost as pc
from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.simulation import SimulatedEngine
from vllm_lookahead.trajectory import StepTrajectory

_EVICT_BYTES = 32 << 20


def record(batch: int, path: Path) -> None:
    """The draft_batch calls of one proposer_cost run, inputs copied."""
    prompts = [pc.toy_text(pc.ToyLanguage(1), random.Random(i), 2048) for i in range(batch)]
    engine = SimulatedEngine(LookaheadConfig(), pc.K, [], model=pc.ToyLanguage(1),
                             max_len=2048 + 128, adaptive=True,
                             drafter=functools.partial(LookaheadDrafter,
                                                       step_cost_prior=pc.SIMULATED_STEP_COST))
    for prompt in prompts:
        engine.add(prompt, max_new_tokens=64)
    calls: list[tuple[Any, ...]] = []
    draft_batch = engine.drafter.draft_batch

    def recording(req_ids: Any, sampled: Any, num_tokens: Any, token_ids: Any,
                  trajectory: Any, requests: Any, step_seconds: Any = None) -> Any:
        arrays = None if trajectory is None else (
            list(trajectory.req_ids), np.asarray(trajectory.bases).copy(),
            np.asarray(trajectory.cu_drafts).copy(), *(a.copy() for a in trajectory.arrays()))
        calls.append((list(req_ids), [list(s) for s in sampled], num_tokens.copy(),
                      token_ids.copy(), arrays))
        return draft_batch(req_ids, sampled, num_tokens, token_ids, trajectory, requests,
                           seconds(req_ids))

    engine.drafter.draft_batch = recording  # type: ignore[method-assign]
    engine.run(64)
    path.write_bytes(pickle.dumps((calls, engine.requests)))


def seconds(req_ids: Sequence[str]) -> float:
    a, b, _ = pc.SIMULATED_STEP_COST
    return a + b * len(req_ids)


def replay(path: Path, repeat: int, cold: bool) -> float:
    """µs per request-step, the fastest of `repeat` replays (the admitting call not counted)."""
    calls, requests = pickle.loads(path.read_bytes())
    scratch = np.zeros(_EVICT_BYTES // 8)
    best = float("inf")
    for _ in range(repeat):
        drafter = LookaheadDrafter(LookaheadConfig(), pc.K, 2048 + 128, True,
                                   step_cost_prior=pc.SIMULATED_STEP_COST)
        spent, request_steps = 0.0, 0
        for i, (req_ids, sampled, num_tokens, token_ids, arrays) in enumerate(calls):
            trajectory = None if arrays is None else StepTrajectory(
                arrays[0], arrays[1], arrays[2], lambda a=arrays: (a[3], a[4]))
            if cold:
                scratch += 1.0
            started = pc.CLOCK()
            drafter.draft_batch(req_ids, sampled, num_tokens, token_ids, trajectory, requests,
                                seconds(req_ids))
            if i:
                spent += pc.CLOCK() - started
                request_steps += len(req_ids)
        best = min(best, 1e6 * spent / request_steps)
    return best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="evict the caches before each call")
    parser.add_argument("--traffic", type=Path, default=None,
                        help="where the recording is kept (default: a file per batch in /tmp)")
    args = parser.parse_args(argv)
    path = args.traffic or Path(f"/tmp/vllm-lookahead-traffic-{args.batch}.pkl")
    if not path.exists():
        record(args.batch, path)
    LookaheadDrafter(LookaheadConfig(), pc.K, 64, True).warm_up()
    started = time.monotonic()
    us = replay(path, args.repeat, args.cold)
    print(f"batch {args.batch}: {us:.2f} µs per request-step, fastest of {args.repeat} "
          f"({'cold' if args.cold else 'warm'} caches; {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
