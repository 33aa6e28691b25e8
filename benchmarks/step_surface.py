"""What an engine step costs on this machine, by rows in the batch and draft tokens verified: the
data behind the drafter's step-cost prior (`step_cost.CPU_STEP_COST_PRIOR`).

For each K, one engine (its own process) decodes batches of 1, 8 and 32 requests with lookahead's
fixed chain (`adaptive: false`: every request drafts up to K tokens a step; K = 0 is no
speculation), greedy, `ignore_eos`, fresh prompts each time so that no cross-request corpus makes
chains longer than they would be. A decode step's time excludes the prefill (a one-token run of the
same prompts is subtracted); the draft tokens per step come from vLLM's own counter. Then a least
squares fit of ms per step = a + b·rows + c·(rows + drafts) over every cell: a per step, b per row,
c per verified token.

Usage: ``python -m benchmarks.step_surface [--model smollm2-135m] [--k 0,2,4,8]
[--batches 1,8,32] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_LEN = 128
MAX_TOKENS = 40


def _counter(llm: Any, name: str) -> int:
    return sum(int(getattr(m, "count", None) or getattr(m, "value", 0))
               for m in llm.get_metrics() if m.name == name)


def _steps(llm: Any) -> int:
    """Engine iterations: vLLM observes its tokens-per-iteration histogram once per step."""
    return _counter(llm, "vllm:iteration_tokens_total")


def _generate(llm: Any, prompts: list[dict[str, Any]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started


def _prompts(batch: int, salt: int, vocab: int) -> list[dict[str, Any]]:
    """Token prompts with short repeats (so that chains are accepted sometimes), new per salt."""
    return [{"prompt_token_ids": [(101 + 7 * (i % 17) + 13 * j + 997 * salt) % vocab
                                  for i in range(PROMPT_LEN)]} for j in range(batch)]


def measure(model: str, k: int, batches: Sequence[int], dtype: str) -> list[dict[str, Any]]:
    from vllm import LLM

    spec = None if k == 0 else {"method": "lookahead", "num_speculative_tokens": k,
                                "lookahead": {"adaptive": False, "ngram_size": min(4, k + 1)}}
    llm = LLM(model=model, seed=0, dtype=dtype, max_model_len=PROMPT_LEN + MAX_TOKENS + 64,
              max_num_seqs=max(batches), enable_prefix_caching=False, disable_log_stats=False,
              speculative_config=spec)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    cells = []
    for salt, batch in enumerate(batches):
        _generate(llm, _prompts(batch, 100 + salt, vocab), 4)  # warm-up
        prompts = _prompts(batch, salt, vocab)
        before = _steps(llm)
        prefill_s = _generate(llm, prompts, 1)
        prefill_steps = _steps(llm) - before
        before = _steps(llm)
        drafted = _counter(llm, "vllm:spec_decode_num_draft_tokens")
        wall = _generate(llm, prompts, MAX_TOKENS)
        steps = _steps(llm) - before - prefill_steps
        drafts = _counter(llm, "vllm:spec_decode_num_draft_tokens") - drafted
        cells.append({"k": k, "rows": batch, "steps": steps,
                      "ms_per_step": 1000 * (wall - prefill_s) / steps,
                      "drafts_per_step": drafts / steps})
        print(cells[-1], flush=True)
    return cells


def fit(cells: Sequence[dict[str, Any]]) -> dict[str, float]:
    """ms per step = a + b·rows + c·tokens (tokens = rows + drafts), least squares."""
    x = np.array([[1.0, c["rows"], c["rows"] + c["drafts_per_step"]] for c in cells])
    y = np.array([c["ms_per_step"] for c in cells])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"a_ms": float(a), "b_ms_per_row": float(b), "c_ms_per_token": float(c)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", default="0,2,4,8", help="draft tokens per request, comma-separated")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from benchmarks.engine import configure_env
    from benchmarks.models import ensure_model

    configure_env("cpu", kv_cache_gib=2)

    model = str(ensure_model(args.model))
    if args.one is not None:
        print("CELLS " + json.dumps(measure(model, args.one, batches, args.dtype)), flush=True)
        return
    cells: list[dict[str, Any]] = []
    for k in (int(v) for v in args.k.split(",")):
        # One process per engine, so that each starts from a clean slate.
        run = subprocess.run([sys.executable, "-m", "benchmarks.step_surface", "--model",
                              args.model, "--dtype", args.dtype, "--batches", args.batches,
                              "--one", str(k)], check=True, capture_output=True, text=True)
        line = next(x for x in run.stdout.splitlines() if x.startswith("CELLS "))
        cells += json.loads(line.removeprefix("CELLS "))
    print("| K | rows | ms per step | drafts per step |\n|---|---|---|---|")
    for c in cells:
        print(f"| {c['k']} | {c['rows']} | {c['ms_per_step']:.1f} | {c['drafts_per_step']:.1f} |")
    result = {"model": args.model, "dtype": args.dtype, "cells": cells, "fit": fit(cells)}
    print("fit:", {k: round(v, 2) for k, v in result["fit"].items()})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
