"""The lookahead drafter's own cost, without vLLM: microseconds per request per step.

Drives a drafter with the simulated engine of `vllm_lookahead.simulation` (greedy verification,
batch rows shuffled every step unless
`--keep-order`) over a deterministic toy language with repeated phrases, so pools
fill and chains get accepted as in real traffic, with adaptive chains and the simulated device's
step time (`SIMULATED_STEP_COST`) handed to every call, so the cost model fits each step. For each
batch size it times,
after the step that admits the prompts, the reference drafter (`reference`, pure Python), the
compiled one (`compiled`) and, on the same inputs in the same run, vLLM's own
`NgramProposer.propose` (prompt lookup, its default n = 5, K = 7). It prints µs per request-step,
a digest of every chain proposed (the compiled drafter's must equal the reference's), the pools'
bytes per stored continuation and the text index's bytes per token, then the longest drafter call
while one long prompt is admitted: whole in the step that samples it, or while vLLM prefills it in
chunks (the compiled drafter indexes it meanwhile). Times are CPU time (`CLOCK`).

Usage:
``python -m benchmarks.proposer_cost [--batch 1,64,256] [--prompt-len 2048] [--tokens 64]
[--repeat 3] [--admit 32768] [--drafters reference,compiled] [--lookahead JSON] [--breakdown]
[--keep-order]``

The batch's rows are shuffled every step, the worst case for the compiled drafter, which reuses
the last step's slots when the rows come in the same order. `--keep-order` keeps them in order, as
vLLM's persistent batch does while no request arrives or leaves.

With `--breakdown` the compiled drafter's time is split into its one kernel call per step
(`step.step`: sync, compose and cut of the whole batch) and the Python around it (request ids to
slots, trajectory arrays, the output lists); the extra timer adds a little to the total.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vllm_lookahead import context_index, step
from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.reference.drafter import ReferenceDrafter
from vllm_lookahead.reference.jacobi_window import splitmix64
from vllm_lookahead.simulation import SimulatedEngine
from vllm_lookahead.trajectory import Requests

VOCAB = 2000
K = 7
NGRAM_N = 5
CLOCK = time.process_time
"""CPU time of the process: on a machine shared with other jobs, wall time would count the time
the scheduler gives them. Every drafter here, and vLLM's ngram (one numba thread below 8192
batch tokens, and then at most min(1, cores // 2)), runs on the calling thread."""
SIMULATED_STEP_COST = (0.01, 0.0005, 0.0001)
"""Seconds per step, per row and per verified draft token of the simulated device: one where
drafting pays (an accelerator's shape, a draft token at a fifth of a row), so that the drafter does
all of its work at every batch size. The drafters start from this shape too: their cost fit learns
a token's cost only from steps that verify drafts, so a prior that priced tokens out at a large
batch would never draft there."""

DRAFTERS: dict[str, Callable[..., Any]] = {"reference": ReferenceDrafter,
                                           "compiled": LookaheadDrafter}


_MASK64 = (1 << 64) - 1
NOVEL_PERCENT = 10
"""Positions (in a hundred) where the toy model says something new, a token no context predicts.
At 10 the drafters make about 1.8 tokens per step, as lookahead does on the real models of
`benchmarks.run` (1.3 to 2.4); without them the text soon cycles and nearly every draft is
accepted (about 5 tokens per step), which is neither real traffic nor what costs most per step."""


class ToyLanguage:
    """Next token from the last two, but at `novel_percent` of positions a new one: half the
    contexts continue a short cycle, so phrases repeat. A fixed function of the seed and the
    tokens, whatever order it is asked in: the traffic is the same whether the batch's rows are
    shuffled or kept in order."""

    def __init__(self, seed: int, novel_percent: int = NOVEL_PERCENT) -> None:
        self._seed = seed
        self._novel_percent = novel_percent
        self._table: dict[tuple[int, int], int] = {}

    def __call__(self, tokens: Sequence[int]) -> int:
        at = len(tokens)
        if _mix64(self._seed, at, tokens[0]) % 100 < self._novel_percent:
            return _mix64(self._seed, at, tokens[-1]) % VOCAB
        key = (tokens[-2] if at > 1 else 0, tokens[-1])
        if key not in self._table:
            draw = _mix64(self._seed, *key)
            cyclic = draw & 1 == 0
            self._table[key] = (tokens[-1] * 7 + 3) % 64 if cyclic else (draw >> 1) % VOCAB
        return self._table[key]


def _mix64(*values: int) -> int:
    """A well-spread 64-bit hash of small non-negative integers (SplitMix64 over each in turn)."""
    h = 0
    for value in values:
        h = splitmix64((h + value) & _MASK64)[1]
    return h


def toy_text(language: ToyLanguage, rng: random.Random, n: int) -> list[int]:
    """Text of the toy language with one token in ten replaced at random."""
    tokens = [rng.randrange(VOCAB)]
    while len(tokens) < n:
        tokens.append(language(tokens) if rng.random() > 0.1 else rng.randrange(VOCAB))
    return tokens


@dataclasses.dataclass
class Result:
    drafter: str
    batch: int
    spent: float
    """Seconds inside draft_batch over the timed steps (every step after the admitting one)."""
    request_steps: int
    accepted: int
    digest: str
    """Of every chain proposed, the admitting step's included."""
    continuations: int
    pool_bytes: int
    text_tokens: int
    index_bytes: int
    ngram_spent: float | None = None
    """vLLM's NgramProposer.propose on the same inputs, same steps."""
    kernel_spent: float | None = None
    """Of `spent`, seconds inside `step.step` (with --breakdown)."""

    @property
    def us_per_request_step(self) -> float:
        return 1e6 * self.spent / max(self.request_steps, 1)

    @property
    def kernel_us(self) -> float | None:
        if self.kernel_spent is None:
            return None
        return 1e6 * self.kernel_spent / max(self.request_steps, 1)

    @property
    def ngram_us(self) -> float | None:
        if self.ngram_spent is None:
            return None
        return 1e6 * self.ngram_spent / max(self.request_steps, 1)


def vllm_ngram(batch: int, max_len: int) -> Any | None:
    """vLLM's own prompt-lookup proposer, built as its runner builds it (None without vLLM)."""
    try:
        from types import SimpleNamespace

        from vllm.v1.spec_decode.ngram_proposer import NgramProposer
    except ImportError:
        return None
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(prompt_lookup_min=NGRAM_N, prompt_lookup_max=NGRAM_N,
                                           num_speculative_tokens=K),
        model_config=SimpleNamespace(max_model_len=max_len),
        scheduler_config=SimpleNamespace(max_num_seqs=max(batch, 1)),
        parallel_config=SimpleNamespace(tensor_parallel_size=1))
    return NgramProposer(config)


def run(batch: int, tokens: int, prompt_len: int = 300, drafter: str = "compiled",
        ngram: bool = False, adaptive: bool = True, cfg: LookaheadConfig | None = None,
        breakdown: bool = False, keep_order: bool = False) -> Result:
    prompts = [toy_text(ToyLanguage(1), random.Random(i), prompt_len) for i in range(batch)]
    max_len = prompt_len + tokens + 64
    engine = SimulatedEngine(cfg or LookaheadConfig(), K, [], model=ToyLanguage(1),
                             max_len=max_len, adaptive=adaptive,
                             drafter=functools.partial(DRAFTERS[drafter],
                                                       step_cost_prior=SIMULATED_STEP_COST),
                             shuffle_rows=not keep_order)
    for prompt in prompts:  # as vLLM's requests, with their max_tokens
        engine.add(prompt, max_new_tokens=tokens)
    rival = vllm_ngram(batch, max_len) if ngram else None
    draft_batch = engine.drafter.draft_batch
    digest = hashlib.sha256()
    timed = {"spent": 0.0, "steps": 0, "ngram": 0.0, "calls": 0, "drafted": 0, "kernel": 0.0,
             "kernel_now": 0.0}
    kernel_step = step.step

    def timed_kernel(*args: Any) -> Any:
        started = CLOCK()
        total = kernel_step(*args)
        timed["kernel_now"] += CLOCK() - started
        return total

    def timed_call(req_ids: Any, sampled: Any, num_tokens: Any, token_ids: Any, *args: Any,
                   **kwargs: Any) -> list[list[int]]:
        timed["calls"] += 1
        # A step time that follows the load (rows and the draft tokens just verified), as the
        # proposer measures it between calls.
        a, b, c = SIMULATED_STEP_COST
        seconds = a + b * len(req_ids) + c * timed["drafted"] + 0.001 * (timed["calls"] % 5)
        started = CLOCK()
        chains = draft_batch(req_ids, sampled, num_tokens, token_ids, *args,
                             step_seconds=seconds)
        spent = CLOCK() - started
        rival_spent = 0.0
        if rival is not None:
            started = CLOCK()
            rival.propose(K, sampled, num_tokens, token_ids)
            rival_spent = CLOCK() - started
        if timed["calls"] > 1:  # the first call admits every prompt (and compiles ngram's kernel)
            timed["spent"] += spent
            timed["steps"] += len(chains)
            timed["ngram"] += rival_spent
            timed["kernel"] += timed["kernel_now"]
        timed["kernel_now"] = 0.0
        timed["drafted"] = sum(len(chain) for chain in chains)
        digest.update(repr(chains).encode())
        return chains

    engine.drafter.draft_batch = timed_call  # type: ignore[method-assign]
    step.step = timed_kernel if breakdown else kernel_step
    try:
        engine.run(tokens)
    finally:
        step.step = kernel_step
    kernel = timed["kernel"] if breakdown and drafter == "compiled" else None
    return Result(drafter, batch, timed["spent"], timed["steps"],
                  engine.drafter.stats.accepted_tokens, digest.hexdigest()[:16],
                  *memory(engine.drafter), ngram_spent=timed["ngram"] if rival else None,
                  kernel_spent=kernel)


def memory(drafter: Any) -> tuple[int, int, int, int]:
    """(continuations, pool bytes, text tokens, text index bytes) of the live requests."""
    if isinstance(drafter, ReferenceDrafter):
        states = list(drafter.states.values())
        return (sum(len(s.pool) for s in states), sum(s.pool.nbytes() for s in states),
                sum(len(s.text) for s in states), sum(s.text.nbytes() for s in states))
    slots = [h.slot for h in drafter.states.values()]
    state = drafter._state
    indexes = [step.request_index(state, s) for s in slots]
    return (step.pool_sizes(state, np.array(slots, dtype=np.int64))[1],
            sum(step.pool_bytes(state, s) for s in slots),
            sum(context_index.length_of(i) for i in indexes),
            sum(context_index.table_nbytes(i) for i in indexes))


PREFILL_CHUNKS = (4096, 16384)
"""vLLM's default prefill tokens per step (`max_num_batched_tokens`) for `LLM` on CPU and on large
GPUs: the pace of the chunked prefills timed below."""


def admission_ms(drafter: str, prompt_len: int, repeat: int, chunk: int | None) -> float:
    """Milliseconds of the longest drafter call while one request with a prompt of `prompt_len`
    tokens is admitted: prefilled by vLLM `chunk` tokens per step (the drafter indexes the prompt
    meanwhile), or, with no chunk, in the one step that samples (a prefix-cache hit), where the
    whole prompt is indexed at once. The fastest of `repeat`."""
    rng = random.Random(7)
    phrase = [rng.randrange(VOCAB) for _ in range(200)]
    prompt = [t if rng.random() > 0.1 else rng.randrange(VOCAB) for t in
              (phrase * (prompt_len // len(phrase) + 1))[:prompt_len]]
    tokens = np.array([[*prompt, 5]], dtype=np.int32)
    starts = range(0, prompt_len, chunk) if chunk else [0]
    best = float("inf")
    for _ in range(repeat):
        # The reference indexes every prompt whole, at its first sample.
        pace = {"prefill_chunk": chunk} if drafter == "compiled" else {}
        d = DRAFTERS[drafter](LookaheadConfig(), K, prompt_len + 64, True, **pace)
        requests = Requests()
        requests.add("long", prompt_len, max_new_tokens=64)
        longest = 0.0
        for computed in starts:
            last = computed == starts[-1]
            requests.computed["long"] = computed
            started = CLOCK()
            d.draft_batch(["long"], [[5] if last else []], np.array([prompt_len + int(last)]),
                          tokens, None, requests)
            longest = max(longest, CLOCK() - started)
        best = min(best, longest)
    return 1e3 * best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,64,256", help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the fastest counts")
    parser.add_argument("--admit", type=int, default=32768, help="long prompt to admit; 0: skip")
    parser.add_argument("--drafters", default="reference,compiled")
    parser.add_argument("--no-ngram", action="store_true", help="skip vLLM's NgramProposer")
    parser.add_argument("--breakdown", action="store_true",
                        help="split the compiled drafter's time into kernel and Python")
    parser.add_argument("--keep-order", action="store_true",
                        help="keep the batch's rows in order (default: shuffled every step)")
    parser.add_argument("--lookahead", type=json.loads, default={},
                        help='lookahead parameters as JSON, e.g. \'{"guess_set_size": 1}\' '
                             "(the request-step cells; admission uses the defaults)")
    args = parser.parse_args(argv)
    cfg = LookaheadConfig.from_dict(args.lookahead)
    names = args.drafters.split(",")
    LookaheadDrafter(LookaheadConfig(), K, 64, True).warm_up()  # compile outside the timings
    print(f"prompt {args.prompt_len} tokens, {args.tokens} new tokens per request, K={K}, "
          f"adaptive (CPU path), fastest of {args.repeat}, "
          f"rows {'in order' if args.keep_order else 'shuffled every step'}, "
          f"lookahead {args.lookahead or 'defaults'}")
    split = " kernel µs | Python µs |" if args.breakdown else ""
    print("| batch | drafter | µs/request-step |" + split + " vLLM ngram µs | accepted | "
          "chains digest | B/continuation | index B/token |")
    print("|---|---|---|" + "---|---|" * args.breakdown + "---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        for name in names:
            runs = [run(batch, args.tokens, args.prompt_len, name, not args.no_ngram, cfg=cfg,
                        breakdown=args.breakdown, keep_order=args.keep_order)
                    for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r.us_per_request_step)
            ngram = min((r.ngram_us for r in runs if r.ngram_us is not None), default=None)
            assert len({r.digest for r in runs}) == 1, "chains differ between runs"
            kernel = best.kernel_us
            cells = ("" if not args.breakdown else " - | - |" if kernel is None else
                     f" {kernel:.1f} | {best.us_per_request_step - kernel:.1f} |")
            print(f"| {batch} | {name} | {best.us_per_request_step:.1f} |{cells} "
                  f"{'-' if ngram is None else f'{ngram:.1f}'} | {best.accepted} | "
                  f"{best.digest} | {best.pool_bytes / max(best.continuations, 1):.0f} | "
                  f"{best.index_bytes / max(best.text_tokens, 1):.0f} |", flush=True)
    if args.admit:
        print(f"admitting one {args.admit}-token prompt: ms of the longest drafter call")
        print("| drafter | whole in one step | " + " | ".join(
            f"prefilled {chunk} per step" for chunk in PREFILL_CHUNKS) + " |")
        print("|---|---|" + "---|" * len(PREFILL_CHUNKS))
        for name in names:
            cells = [admission_ms(name, args.admit, args.repeat, chunk)
                     for chunk in (None, *PREFILL_CHUNKS)]
            print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
