"""Benchmark harness: every speculative method on the same engine settings, model and prompts.

    python -m benchmarks.run --datasets mtbench,gsm8k --num-prompts 4 --concurrency 1,8 \\
        --max-tokens 64 --lookahead-grid "N=3,W=4;N=5,W=8,G=16" --out benchmarks/results/NAME
    python -m benchmarks.run --quick        # smoke test of the harness (tiny model; not timed)

Each method gets one engine (max_num_seqs = the largest concurrency), warmed up, then measured on
every dataset x concurrency cell. Concurrency c is a closed loop: c requests are in flight and the
next prompt is submitted the moment one finishes, as c concurrent clients would; a request's
latency runs from its submission to its last token. Generation is greedy with the same seed for
every method, and every method's outputs are compared token by token with `none`'s in the same
cell. Counters are read before and after each cell, so a cell's figures are its own.

Writes results.json, results.md and PNG plots under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine as eng
from benchmarks.datasets import PROMPT_SETS, chat_prompts
from benchmarks.models import DEFAULT_MODEL
from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError

BASELINE = "none"
ALL_DATASETS = "all"
BUILTIN_METHODS: dict[str, dict[str, Any] | None] = {
    BASELINE: None,
    # vLLM's documented n-gram example; vLLM sets the unset prompt_lookup_min to the max (4).
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
    # K=32 is vLLM's suggested cap (suffix drafts adaptively up to it). The global tree of past
    # responses is off: this harness replays the same prompts at every concurrency, and a global
    # tree would recall the earlier answers verbatim. Each request's own prompt+output tree stays.
    "suffix": {"method": "suffix", "num_speculative_tokens": 32,
               "suffix_decoding_max_cached_requests": 0},
    "lookahead": {"method": "lookahead"},
}
GRID_KEYS = {"N": "ngram_size", "W": "window_size", "G": "guess_set_size", "A": "adaptive"}
QUICK = {"model": eng.TINY_MODEL, "datasets": "mtbench,gsm8k", "num_prompts": 2,
         "max_tokens": 16, "concurrency": [1], "methods": "none,lookahead", "lookahead_grid": ""}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    speculative_config: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method on one dataset at one concurrency: what was generated and the counter deltas."""

    method: str
    dataset: str
    concurrency: int
    batch: eng.Batch
    delta: eng.Counters


def parse_grid(spec: str) -> list[Method]:
    """`"N=3,W=4;N=5,W=8,G=16"` -> lookahead methods; K sets num_speculative_tokens. Each point
    is validated here, so that a bad one fails before any engine has run."""
    return [_grid_point(p.strip()) for p in spec.split(";") if p.strip()]


def _grid_point(point: str) -> Method:
    values: dict[str, int] = {}
    for item in point.split(","):
        key, _, value = item.partition("=")
        key = key.strip().upper()
        if key not in (*GRID_KEYS, "K") or not value.strip().isdigit():
            raise SystemExit(f"--lookahead-grid: bad {item!r} in {point!r}; use N (ngram_size), "
                             "W (window_size), G (guess_set_size), A (adaptive, 0 or 1) or K, "
                             "each =<integer>")
        values[key] = int(value)
    params: dict[str, Any] = {GRID_KEYS[k]: v for k, v in values.items() if k in GRID_KEYS}
    if "adaptive" in params:
        params["adaptive"] = bool(params["adaptive"])
    try:
        LookaheadConfig.from_dict(params).resolve_num_speculative_tokens(
            values.get("K"), window_given="window_size" in params)
    except LookaheadConfigError as e:
        raise SystemExit(f"--lookahead-grid {point!r}: {e}") from None
    config: dict[str, Any] = {"method": "lookahead", "lookahead": params}
    if "K" in values:
        config["num_speculative_tokens"] = values["K"]
    name = ",".join(f"{k}={v}" for k, v in values.items())
    return Method(f"lookahead[{name}]", config)


def select_methods(names: str, grid: str) -> tuple[list[Method], dict[str, str]]:
    """The methods to run (the baseline first, always) and those that cannot run here, with why."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(BUILTIN_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(BUILTIN_METHODS)}")
    unavailable = {}
    if "suffix" in chosen and (why := _suffix_unavailable()):
        unavailable["suffix"] = why
    names_in_order = [BASELINE, *(n for n in chosen if n != BASELINE and n not in unavailable)]
    methods = [Method(n, BUILTIN_METHODS[n]) for n in names_in_order]
    return methods + parse_grid(grid), unavailable


def _suffix_unavailable() -> str | None:
    """Why vLLM's suffix method cannot run here: it needs the arctic-inference package."""
    try:
        importlib.import_module("arctic_inference.suffix_decoding")
    except ImportError as e:
        # Either not installed, or installed with a native extension or dependency that fails.
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("arctic")
        return "arctic-inference not installed" if missing else f"arctic-inference: {e}"
    return None


def measure(method: Method, cfg: eng.EngineConfig, prompt_sets: dict[str, list[list[int]]],
            concurrencies: Sequence[int], params: Any,
            tokenizer: Any) -> tuple[list[Cell], dict[str, Any]]:
    started = time.perf_counter()
    cells = []
    with eng.engine(cfg, method.speculative_config) as engine:
        vllm_config = engine.llm.llm_engine.vllm_config
        info = {"name": method.name, "speculative_config": method.speculative_config,
                "engine_start_s": round(time.perf_counter() - started, 1),
                # vLLM turns async scheduling off for most speculative methods; say so next to
                # the numbers it affects.
                "async_scheduling": vllm_config.scheduler_config.async_scheduling,
                "num_speculative_tokens": getattr(vllm_config.speculative_config,
                                                  "num_speculative_tokens", None)}
        eng.warm_up(engine, tokenizer, max(concurrencies))
        for concurrency in concurrencies:
            for dataset, prompts in prompt_sets.items():
                before = eng.read_counters(engine)
                batch = eng.generate(engine, prompts, params, concurrency)
                cells.append(Cell(method.name, dataset, concurrency, batch,
                                  eng.read_counters(engine).minus(before)))
                print_progress(cells[-1])
    return cells, info


def print_progress(cell: Cell) -> None:
    tokens, wall = cell.batch.output_tokens, cell.batch.wall_s
    spec = eng.Speculation.of(tokens, cell.batch.forwards, cell.delta)
    print(f"  {cell.method:<24} {cell.dataset:<14} c={cell.concurrency:<3} {tokens:>6} tokens in "
          f"{wall:6.1f} s = {tokens / wall:7.1f} tok/s, {spec.tokens_per_forward:.2f} tok/forward",
          flush=True)


def summarize(cells: Sequence[Cell], baseline: Sequence[Cell]) -> dict[str, Any]:
    """Figures for one cell or, pooled, for several (tokens and times summed, latencies pooled)."""
    tokens = sum(c.batch.output_tokens for c in cells)
    wall = sum(c.batch.wall_s for c in cells)
    delta = functools.reduce(eng.Counters.plus, (c.delta for c in cells))
    spec = eng.Speculation.of(tokens, sum(c.batch.forwards for c in cells), delta)
    latencies = [o.latency_s for c in cells for o in c.batch.outputs]
    base_rate = sum(c.batch.output_tokens for c in baseline) / sum(c.batch.wall_s for c in baseline)
    row: dict[str, Any] = {
        "method": cells[0].method,
        "dataset": cells[0].dataset if len(cells) == 1 else ALL_DATASETS,
        "concurrency": cells[0].concurrency,
        "prompts": len(latencies),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "speedup": tokens / wall / base_rate,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p90_s": float(np.percentile(latencies, 90)),
        "tokens_per_forward": spec.tokens_per_forward,
        "mean_acceptance_length": spec.mean_acceptance_length,
        "acceptance_rate": spec.acceptance_rate,
        "per_position_acceptance": spec.per_position,
        "drafts": delta.drafts,
        "draft_tokens": delta.draft_tokens,
        "accepted_tokens": delta.accepted,
        "forwards": sum(c.batch.forwards for c in cells),
        "equality": compare_outputs(cells, baseline),
    }
    if delta.proposer is not None:
        samples = [s for c in cells for s in c.batch.pool_samples]
        row["lookahead"] = lookahead_figures(delta.proposer, wall, samples)
    return row


def compare_outputs(cells: Sequence[Cell], baseline: Sequence[Cell]) -> dict[str, Any]:
    ours = [o.token_ids for c in cells for o in c.batch.outputs]
    theirs = [o.token_ids for c in baseline for o in c.batch.outputs]
    differences = [{"prompt": i, "position": first_difference(a, b)}
                   for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    return {"differing_prompts": len(differences), "divergence_rate": len(differences) / len(ours),
            "first_differences": differences}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def lookahead_figures(proposer: dict[str, Any], wall_s: float,
                      samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    steps = proposer["steps"]
    live = [s for s in samples if s["live_requests"]]
    return {
        "propose_ms_per_step": 1000 * proposer["propose_seconds"] / steps if steps else None,
        "propose_share_of_wall": proposer["propose_seconds"] / wall_s,
        "steps": steps,
        "accepted_by_source": proposer["accepted_by_source"],
        "drafted_by_source": proposer["drafted_by_source"],
        "resyncs": proposer["resyncs"],
        # Sampled from the worker's stats file (about once a second); None if no sample fell while
        # a request was live, as in very short runs.
        "pool_max_continuations": max((s["pool_continuations"] for s in live), default=None),
        "pool_max_per_request": max((s["pool_continuations"] / s["live_requests"] for s in live),
                                    default=None),
        "pool_samples": len(live),
    }


def summaries(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """A row per method x dataset x concurrency, and per method x concurrency a pooled `all`."""
    def pick(method: str, concurrency: int, dataset: str | None = None) -> list[Cell]:
        return [c for c in cells if c.method == method and c.concurrency == concurrency
                and (dataset is None or c.dataset == dataset)]

    rows = []
    keys = dict.fromkeys((c.method, c.concurrency) for c in cells)
    for method, concurrency in keys:
        for cell in pick(method, concurrency):
            rows.append(summarize([cell], pick(BASELINE, concurrency, cell.dataset)))
        rows.append(summarize(pick(method, concurrency), pick(BASELINE, concurrency)))
    return rows


def load_prompts(datasets: Sequence[str], tokenizer: Any, limit: int) -> dict[str, list[list[int]]]:
    unknown = sorted(set(datasets) - set(PROMPT_SETS))
    if unknown:
        raise SystemExit(f"--datasets: unknown {unknown}; known: {', '.join(PROMPT_SETS)}")
    return {name: chat_prompts(name, tokenizer, limit) for name in datasets}


def _int_list(text: str) -> list[int]:
    return sorted({int(c) for c in text.split(",")})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a benchmark model, '{eng.TINY_MODEL}' or a Hugging Face folder "
                             "(%(default)s)")
    parser.add_argument("--datasets", default=",".join(PROMPT_SETS), help="(%(default)s)")
    parser.add_argument("--num-prompts", type=int, default=10, help="per dataset (%(default)s)")
    parser.add_argument("--concurrency", type=_int_list, default="1,8",
                        help="requests kept in flight (closed loop), comma-separated "
                             "(%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="(%(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="only sets the environment (KV cache size) and the eager default")
    parser.add_argument("--kv-cache-gib", type=int, default=4,
                        help="CPU KV cache size (%(default)s)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="default: eager on cpu (torch.compile costs minutes at start for "
                             "a few percent), compiled with graphs on cuda")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="default: vLLM decides per method (results.md "
                                           "says what it chose)")
    parser.add_argument("--methods", default=",".join(BUILTIN_METHODS),
                        help=f"from {', '.join(BUILTIN_METHODS)} (all); '{BASELINE}' always "
                             "runs")
    parser.add_argument("--lookahead-grid", default="",
                        help='extra lookahead settings, e.g. "N=3,W=4;N=5,W=8,G=16" (K also)')
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/tmp/<model>-<time>")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test of the harness: tiny model, 2 prompts each of mtbench "
                             "and gsm8k, 16 tokens, c=1, none and lookahead; timings mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.enforce_eager is None:
        args.enforce_eager = args.device == "cpu"
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path("benchmarks/results/tmp") / f"{Path(args.model).name}-{stamp}"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    eng.configure_env(args.device, args.kv_cache_gib)
    # Imported here so that the demo, which borrows from this module, needs no matplotlib.
    from benchmarks import report

    methods, unavailable = select_methods(args.methods, args.lookahead_grid)
    for name, why in unavailable.items():
        print(f"{name}: unavailable ({why})")
    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    prompt_sets = load_prompts([d.strip() for d in args.datasets.split(",")], tokenizer,
                               args.num_prompts)
    all_prompts = [p for ps in prompt_sets.values() for p in ps]
    cfg = eng.EngineConfig(model=model, dtype=args.dtype,
                           max_model_len=eng.model_len_for(all_prompts, tokenizer,
                                                           args.max_tokens),
                           max_num_seqs=max(args.concurrency), seed=args.seed,
                           enforce_eager=args.enforce_eager,
                           async_scheduling=args.async_scheduling)
    params = eng.greedy(args.max_tokens, args.seed)
    accelerator = eng.accelerator_name(args.device)

    cells: list[Cell] = []
    method_info = []
    for method in methods:
        print(f"== {method.name}", flush=True)
        method_cells, info = measure(method, cfg, prompt_sets, args.concurrency, params,
                                     tokenizer)
        cells += method_cells
        method_info.append(info)
        # Published after every method, so a run cut short keeps what it measured.
        complete = method is methods[-1]
        results = {"meta": run_meta(args, model, cfg, prompt_sets, method_info, unavailable,
                                    accelerator, complete),
                   "cells": summaries(cells)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        try:
            report.write(results, args.out)
        except Exception:
            if complete:
                raise
            # A report that fails on partial results must not stop the measurements.
            logging.exception("report of the partial results failed; measuring on")
    print((args.out / "results.md").read_text())
    print(f"results in {args.out}")


def run_meta(args: argparse.Namespace, model: Path, cfg: eng.EngineConfig,
             prompt_sets: dict[str, list[list[int]]], method_info: list[dict[str, Any]],
             unavailable: dict[str, str], accelerator: str | None,
             complete: bool) -> dict[str, Any]:
    import vllm

    return {
        "model": args.model, "model_path": str(model), "dtype": args.dtype,
        "device": args.device, "accelerator": accelerator,
        "enforce_eager": args.enforce_eager, "async_scheduling": args.async_scheduling,
        "max_tokens": args.max_tokens, "seed": args.seed, "concurrency": args.concurrency,
        "prompts": {name: len(ps) for name, ps in prompt_sets.items()},
        "max_model_len": cfg.max_model_len, "quick": args.quick,
        "vllm": vllm.__version__, "host": platform.node(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "methods": method_info, "unavailable": unavailable, "complete": complete,
    }

if __name__ == "__main__":
    main()
