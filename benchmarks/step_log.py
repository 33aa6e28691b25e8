"""Every engine step of a closed-loop stream, timed against the work it ran, with and without
lookahead: whether drafting's steps cost what the drafter's cost model says, in steps that only
decode and in steps that also prefill a new request.

    python -m benchmarks.step_log [--model smollm2-135m] [--dtype float32] [--set gsm8k]
        [--num-prompts 64] [--concurrency 32] [--max-tokens 96] [--rounds 2] [--out FILE.json]

Each method runs on a fresh engine (the order reversed every other round) with vLLM's iteration
details on: per step the engine core's own time for the model's execution (forward, sampling,
proposing), the decoding rows and their scheduled tokens, the prefilling requests and their
tokens, and the draft tokens verified. Then, per method, a least-squares fit of a step's
milliseconds over the steps that only decode (a per step, b per row, c per verified token, as the
cost model fits them) and what the steps that also prefill cost beyond that fit per prefill
token. `--out` keeps every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine as eng
from benchmarks.datasets import chat_prompts
from benchmarks.labels import BASELINE
from benchmarks.methods import builtin_methods

METHODS: list[tuple[str, dict[str, Any] | None]] = [
    (BASELINE, None), ("lookahead", builtin_methods()["lookahead"])]


@dataclasses.dataclass(frozen=True)
class Step:
    model_ms: float
    """The engine core's time for the model's execution, proposing included."""
    wall_ms: float
    """From the previous step's end to this one's, as the benchmark's loop sees it."""
    rows: int
    """Requests that decoded."""
    verified: int
    """Tokens those rows ran through the forward: one each plus the drafts."""
    drafts: int
    prefills: int
    """Requests that prefilled (the whole prompt or a chunk of it)."""
    prefill_tokens: int


def _recorder(llm: Any, steps: list[Step]) -> None:
    """Wraps the engine's stats hook, which sees every step's scheduler stats, to keep a Step."""
    manager = llm.llm_engine.logger_manager
    record = manager.record
    last = [time.perf_counter()]

    def recording(scheduler_stats: Any = None, iteration_stats: Any = None,
                  *args: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is not None and not details.is_dummy:
            spec = scheduler_stats.spec_decoding_stats
            steps.append(Step(details.elapsed_ms, 1000 * (now - last[0]),
                              details.num_generation_requests, details.num_generation_tokens,
                              spec.num_draft_tokens if spec else 0,
                              details.num_ctx_requests, details.num_ctx_tokens))
        last[0] = now
        record(scheduler_stats, iteration_stats, *args, **kwargs)

    manager.record = recording


def run_method(cfg: eng.EngineConfig, tokenizer: Any, prompts: Sequence[Sequence[int]],
               concurrency: int, max_tokens: int,
               speculative_config: dict[str, Any] | None) -> tuple[float, list[Step]]:
    """(wall seconds, steps) of one stream on a fresh engine, after the harness's warm-up."""
    with eng.engine(cfg, speculative_config) as engine:
        eng.warm_up(engine, tokenizer, concurrency)
        steps: list[Step] = []
        _recorder(engine.llm, steps)
        batch = eng.generate(engine, prompts, eng.greedy(max_tokens, 0), concurrency)
        return batch.wall_s, steps


def decode_only(steps: Sequence[Step]) -> list[Step]:
    return [s for s in steps if not s.prefills]


def decode_fit(steps: Sequence[Step]) -> np.ndarray:
    """(a, b, c) ms of model time over the steps that only decode: per step, row, verified token.
    Without drafts rows and verified tokens are the same, so c alone carries them (b = 0)."""
    decode = decode_only(steps)
    x = np.array([[1.0, s.rows, s.verified] for s in decode])
    y = np.array([s.model_ms for s in decode])
    if not any(s.drafts for s in decode):
        coef, *_ = np.linalg.lstsq(x[:, [0, 2]], y, rcond=None)
        return np.array([coef[0], 0.0, coef[1]])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


def summary_row(name: str, wall_s: float, steps: Sequence[Step]) -> str:
    """One method's stream as a row under HEADER."""
    decode = decode_only(steps)
    fit = decode_fit(decode)

    def predicted(s: Step) -> float:
        return float(fit[0] + fit[1] * s.rows + fit[2] * s.verified)

    mixed = [s for s in steps if s.prefills]
    extra = sum(s.model_ms - predicted(s) for s in mixed)
    prefill_tokens = sum(s.prefill_tokens for s in mixed)
    model_ms = sum(s.model_ms for s in steps)
    return (
        f"| {name} | {wall_s:.1f} | {len(steps)} | {model_ms / 1000:.1f} "
        f"| {sum(s.wall_ms for s in steps) / 1000:.1f} "
        f"| {len(decode)}: {np.mean([s.model_ms for s in decode]):.1f} ms, "
        f"{np.mean([s.rows for s in decode]):.1f} rows, "
        f"{np.mean([s.drafts for s in decode]):.1f} drafts "
        f"| {fit[0]:.1f} / {fit[1]:.2f} / {fit[2]:.2f} "
        f"| {len(mixed)}: {sum(s.model_ms for s in mixed) / 1000:.1f} s, "
        f"{np.mean([s.drafts for s in mixed]) if mixed else 0:.1f} drafts "
        f"| {extra / 1000:.1f} s, {extra / max(prefill_tokens, 1):.3f} ms/token |")


HEADER = ["| round: method | wall s | steps | model s | loop s | decode-only steps: mean "
          "| their fit a / b / c ms | steps that also prefill | their time beyond the fit |",
          "|---|---|---|---|---|---|---|---|---|"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--set", default="gsm8k")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    eng.configure_env()
    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    # The first of the set, as a harness run at this one concurrency sends them.
    prompts = chat_prompts(args.set, tokenizer, args.num_prompts)
    cfg = eng.EngineConfig(model, args.dtype,
                           eng.model_len_for(prompts, tokenizer, args.max_tokens),
                           args.concurrency, 0, True, iteration_details=True)
    print(f"{args.model}, {args.dtype}, {args.set}: {len(prompts)} prompts "
          f"at c={args.concurrency}, "
          f"{args.max_tokens} new tokens, greedy, eager")
    print("\n".join(HEADER))
    kept: dict[str, Any] = {}
    for r in range(1, args.rounds + 1):
        for name, config in (METHODS if r % 2 else METHODS[::-1]):
            wall, steps = run_method(cfg, tokenizer, prompts, args.concurrency, args.max_tokens,
                                     config)
            print(summary_row(f"{r}: {name}", wall, steps), flush=True)
            kept[f"{r}: {name}"] = {"wall_s": wall, "steps": [dataclasses.asdict(s) for s in steps]}
    if args.out:
        args.out.write_text(json.dumps(kept))


if __name__ == "__main__":
    main()
