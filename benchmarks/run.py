"""Benchmark harness: every speculative method on the same engine settings, model and prompts.

    python -m benchmarks.run --datasets mtbench,gsm8k,related --num-prompts 4 \\
        --concurrency 1,8,32 --max-tokens 64 --out benchmarks/results/NAME
    python -m benchmarks.run --prompts my-prompts.jsonl --concurrency 1,8 ...   # your prompts
    python -m benchmarks.run --plan ...     # prompts per cell and a time estimate; no engine
    python -m benchmarks.run --quick        # smoke test of the harness (tiny model; not timed)

The methods draft at most the same K tokens per step (--k, 8): vLLM's `ngram` (prompt lookup
2..4), `suffix`, `lookahead` with its defaults, and on CUDA `ngram_gpu`; `suffix` also runs at
vLLM's own default K (`suffix[K=24]`). `none` is the baseline.

Each method gets one engine (max_num_seqs = the largest concurrency), warmed up on prompts of its
own, then measured on every dataset x concurrency cell. Each concurrency level takes its own
slice of every dataset's prompts, disjoint from the other levels' (the same slices for every
method), so no prompt is ever submitted twice to one engine: cross-request caches (suffix's
global tree of earlier responses, a lookahead pool shared across requests) stay at their defaults
and can recall only other requests' answers. Concurrency c is a closed loop: c requests are in
flight and the next prompt is submitted the moment one finishes, as c concurrent clients would; a
request's latency runs from its submission to its last token. A cell at c has at least c prompts
(--num-prompts). Generation is greedy with the same seed for every method, and every method's
outputs are compared token by token with `none`'s in the same cell. Counters are read before and
after each cell, so a cell's figures are its own.

With --rounds R every method runs R times, each round on fresh engines over the same prompts,
the methods' order reversed every other round (A B, B A, A B, ...), so that a drift of the
machine's speed falls on both sides of a comparison. The tables pool the rounds; the rounds
table gives each round's speed-up over `none` of the same round, which shows whether a gap
smaller than the run-to-run noise has a consistent sign. With --interleave a round loads every
method's engine at once and runs each cell with every method in turn (A B, then B A in the next
cell): the pair of a cell is then minutes apart at most, not a whole method run.

Writes results.json, results.md and PNG plots under --out, after every method (every round with
--interleave).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import engine as eng
from benchmarks.datasets import DEFAULT_SETS, EXTRA_SETS, RELATED_SETS
from benchmarks.figures import Cell, round_speedups, summaries
from benchmarks.labels import BASELINE
from benchmarks.methods import (
    DEFAULT_K,
    DEFAULT_METHODS,
    SUFFIX_DEFAULT_ALIAS,
    Method,
    select_methods,
    unavailable_methods,
    vllm_suffix_depth,
)
from benchmarks.models import DEFAULT_MODEL
from benchmarks.progress import Progress, duration, estimate_run_s
from benchmarks.prompt_plan import (
    cell_sizes,
    parse_num_prompts,
    plan_file_prompts,
    plan_prompts,
    tokenize_plan,
)

DEFAULT_DATASETS = ",".join(DEFAULT_SETS)
QUICK = {"model": eng.TINY_MODEL, "datasets": "mtbench,related", "num_prompts": "2",
         "max_tokens": 16, "concurrency": [1, 2], "methods": "none,lookahead",
         "lookahead_grid": ""}


# --- measuring -----------------------------------------------------------------------------

def round_order(methods: Sequence[Method], round_index: int) -> list[Method]:
    """The methods in the order round `round_index` runs them: reversed every other round."""
    return list(methods) if round_index % 2 == 0 else list(reversed(methods))


def measure(method: Method, cfg: eng.EngineConfig,
            plan: Mapping[str, Mapping[int, Sequence[Sequence[int]]]], params: Any,
            tokenizer: Any, round_index: int = 0) -> tuple[list[Cell], dict[str, Any]]:
    """Every cell of `plan` (dataset -> concurrency -> prompts) on one engine for `method`,
    concurrency by concurrency."""
    cells, (info,) = measure_together([method], cfg, plan, params, tokenizer, round_index)
    return cells, info


def measure_together(methods: Sequence[Method], cfg: eng.EngineConfig,
                     plan: Mapping[str, Mapping[int, Sequence[Sequence[int]]]], params: Any,
                     tokenizer: Any, round_index: int = 0
                     ) -> tuple[list[Cell], list[dict[str, Any]]]:
    """Every cell of `plan` for every method, with all the methods' engines loaded at once and
    each cell run by every method in turn, the order reversed from one cell to the next: a
    drift of the machine's speed during the round falls on both sides of every cell's pair.
    A method's `elapsed_s` is its engine's start, warm-up and cells, not the others'."""
    cells: list[Cell] = []
    infos: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        engines = {}
        for method in methods:
            started = time.perf_counter()
            engines[method.name] = stack.enter_context(eng.engine(cfg, method.speculative_config))
            infos[method.name] = engine_info(method, engines[method.name], started, round_index)
            eng.warm_up(engines[method.name], tokenizer, max(_concurrencies(plan)))
            infos[method.name]["elapsed_s"] = time.perf_counter() - started
        for method, concurrency, dataset, prompts in interleaved_order(methods, plan):
            started = time.perf_counter()
            cells.append(measure_cell(method, engines[method.name], dataset, concurrency,
                                      prompts, params, round_index))
            infos[method.name]["elapsed_s"] += time.perf_counter() - started
    for info in infos.values():
        info["elapsed_s"] = round(info["elapsed_s"], 1)
    return cells, list(infos.values())


def _concurrencies(plan: Mapping[str, Mapping[int, Any]]) -> list[int]:
    return sorted({c for by_c in plan.values() for c in by_c})


def cell_order(plan: Mapping[str, Mapping[int, Sequence[Sequence[int]]]]
               ) -> list[tuple[int, str, Sequence[Sequence[int]]]]:
    """(concurrency, dataset, prompts) in the order a run measures them: concurrency by
    concurrency, the sets in the plan's order."""
    return [(c, dataset, by_c[c]) for c in _concurrencies(plan) for dataset, by_c in plan.items()]


def interleaved_order(methods: Sequence[Method],
                      plan: Mapping[str, Mapping[int, Sequence[Sequence[int]]]]
                      ) -> list[tuple[Method, int, str, Sequence[Sequence[int]]]]:
    """(method, concurrency, dataset, prompts): every cell of `cell_order` with every method in
    turn, the methods' order reversed from one cell to the next (A B, B A, A B, ...)."""
    return [(method, concurrency, dataset, prompts)
            for number, (concurrency, dataset, prompts) in enumerate(cell_order(plan))
            for method in round_order(methods, number)]


def engine_info(method: Method, engine: eng.Engine, started: float, round_index: int
                ) -> dict[str, Any]:
    vllm_config = engine.llm.llm_engine.vllm_config
    return {"name": method.name, "round": round_index,
            "speculative_config": method.speculative_config,
            "engine_start_s": round(time.perf_counter() - started, 1),
            # vLLM turns async scheduling off for most speculative methods; say so next to
            # the numbers it affects.
            "async_scheduling": vllm_config.scheduler_config.async_scheduling,
            "num_speculative_tokens": getattr(vllm_config.speculative_config,
                                              "num_speculative_tokens", None)}


def measure_cell(method: Method, engine: eng.Engine, dataset: str, concurrency: int,
                 prompts: Sequence[Sequence[int]], params: Any, round_index: int) -> Cell:
    progress = Progress(f"{method.name} {dataset} c={concurrency}", len(prompts),
                        params.max_tokens)
    before = eng.read_counters(engine)
    batch = eng.generate(engine, prompts, params, concurrency, progress)
    cell = Cell(method.name, dataset, concurrency, batch,
                eng.read_counters(engine).minus(before), round_index)
    print_progress(cell)
    return cell


def print_progress(cell: Cell) -> None:
    tokens, wall = cell.batch.output_tokens, cell.batch.wall_s
    spec = eng.Speculation.of(tokens, cell.batch.forwards, cell.delta)
    print(f"  {cell.method:<16} {cell.dataset:<14} c={cell.concurrency:<3} "
          f"{len(cell.batch.outputs):>3} requests {tokens:>6} tokens in {wall:6.1f} s = "
          f"{tokens / wall:7.1f} tok/s, {spec.tokens_per_forward:.2f} tok/forward", flush=True)


# --- command line --------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return sorted({int(c) for c in text.split(",")})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a benchmark model, '{eng.TINY_MODEL}' or a Hugging Face folder "
                             "(%(default)s)")
    parser.add_argument("--datasets", default=None,
                        help=f"({DEFAULT_DATASETS}); also, only when named: "
                             f"{','.join(EXTRA_SETS)}, kinds that rework text the prompt holds")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE.jsonl",
                        help="your own prompts instead of the built-in sets, in the format of "
                             "vLLM's custom dataset (`vllm bench serve --dataset-name custom`): "
                             'a JSON object per line with a "prompt" (a user message, sent in '
                             "the model's chat template); one set named after the file, sliced "
                             'per concurrency like the others. A line\'s "output_tokens" is '
                             "checked but --max-tokens applies to every prompt, as vLLM's "
                             "--custom-output-len does unless it is -1")
    parser.add_argument("--num-prompts", default="4",
                        help="prompts per set in each cell: N is at least N, raised to c at "
                             "concurrency c; or per concurrency, e.g. 1:4,8:16,32:32. Each "
                             "concurrency takes its own prompts (%(default)s)")
    parser.add_argument("--concurrency", type=_int_list, default="1,8,32",
                        help="requests kept in flight (closed loop), comma-separated "
                             "(%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="(%(default)s)")
    parser.add_argument("--k", type=int, default=DEFAULT_K,
                        help="draft tokens per step at most, for ngram, suffix, lookahead and "
                             "ngram_gpu (%(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="sets the environment (KV cache size), the eager default and "
                             "whether ngram_gpu can run")
    parser.add_argument("--kv-cache-gib", type=int, default=4,
                        help="CPU KV cache size (%(default)s)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="default: eager on cpu (torch.compile costs minutes at start for "
                             "a few percent), compiled with graphs on cuda")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="default: vLLM decides per method (results.md "
                                           "says what it chose)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="from none, ngram, suffix, suffix[K=<vLLM's default>] (or "
                             f"{SUFFIX_DEFAULT_ALIAS}), lookahead, ngram_gpu (CUDA only); "
                             f"'{BASELINE}' always runs (%(default)s)")
    parser.add_argument("--lookahead-grid", default="",
                        help='extra lookahead settings, e.g. "A=0;N=5,G=16;S=0" (K, W too); '
                             "a point without K or W drafts --k tokens")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, each round on fresh engines over "
                             "the same prompts, the order of the methods reversed every other "
                             "round; the report pairs each round with `none`'s (%(default)s)")
    parser.add_argument("--interleave", action="store_true",
                        help="load every method's engine at once (fresh ones each round) and run "
                             "each cell with every method in turn, the order reversed from cell "
                             "to cell: a tighter pairing than one engine after another; the "
                             "engines share the machine's memory (CPU only)")
    parser.add_argument("--reuse-prompts", action="store_true",
                        help="the old design: every concurrency replays the same first prompts, "
                             "with suffix's global cache and lookahead's shared pool off so that "
                             "they cannot recall them")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/tmp/<model>-<time>")
    parser.add_argument("--plan", action="store_true",
                        help="print the methods, prompts per cell and an estimated duration, "
                             "and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test of the harness: tiny model, 2 prompts each of mtbench "
                             "and related (or of --prompts FILE) per cell, 16 tokens, c=1,2, "
                             "none and lookahead; timings mean nothing")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.prompts is not None and args.datasets is not None:
        parser.error("--prompts replaces the built-in sets: give --prompts or --datasets")
    if args.datasets is None:
        args.datasets = DEFAULT_DATASETS
    if args.quick:
        # A quick run on a prompt file keeps the file: a smoke test of the user's own prompts.
        vars(args).update({k: v for k, v in QUICK.items()
                           if not (k == "datasets" and args.prompts is not None)})
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.interleave and args.device == "cuda":
        # Each vLLM engine on CUDA claims a fixed share of the GPU's memory at start.
        parser.error("--interleave: CPU only (two CUDA engines would ask for 0.9 of the GPU's "
                     "memory each)")
    try:
        args.num_prompts = parse_num_prompts(str(args.num_prompts))
    except argparse.ArgumentTypeError as e:
        parser.error(f"--num-prompts: {e}")
    if args.enforce_eager is None:
        args.enforce_eager = args.device == "cpu"
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path("benchmarks/results/tmp") / f"{Path(args.model).name}-{stamp}"
    return args


def describe_plan(methods: Sequence[Method], skipped: Mapping[str, str],
                  plan: Mapping[str, Mapping[int, Sequence[Any]]], estimate_s: float | None,
                  reuse: bool, rounds: int = 1, interleave: bool = False) -> list[str]:
    sizes = next(iter(plan.values()))
    per_method = sum(len(p) for by_c in plan.values() for p in by_c.values())
    lines = [f"methods: {', '.join(m.name for m in methods)}",
             *(f"{name}: not run ({why})" for name, why in skipped.items()),
             f"datasets: {', '.join(plan)}; prompts per set: "
             + ", ".join(f"{len(p)} at c={c}" for c, p in sizes.items())
             + (" (the same prompts at every concurrency)" if reuse
                else " (each concurrency its own prompts)")
             + f"; {per_method} requests per method"
             + (f" and round, {rounds} rounds (the order reversed every other round)"
                if rounds > 1 else "")
             + ("; every method's engine loaded at once, the methods taking turns cell by cell"
                if interleave else "")]
    if estimate_s is not None:
        lines.append(f"estimated duration: about {duration(estimate_s)} ({round(estimate_s)} s), "
                     "from this model's reference rates on a 2-core CPU (scales with the "
                     "machine)")
    else:
        lines.append("estimated duration: no reference rates for this model and dtype; an "
                     "estimate follows the baseline")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    eng.configure_env(args.device, args.kv_cache_gib)
    methods, skipped = select_methods(args.methods, args.lookahead_grid, args.k,
                                      suffix_depth=vllm_suffix_depth(),
                                      unavailable=unavailable_methods(args.device),
                                      reuse_prompts=args.reuse_prompts)
    sizes = cell_sizes(args.concurrency, args.num_prompts)
    if args.prompts is not None:
        texts = plan_file_prompts(args.prompts, sizes, args.reuse_prompts)
    else:
        texts = plan_prompts([d.strip() for d in args.datasets.split(",") if d.strip()], sizes,
                             args.reuse_prompts)
    estimate = estimate_run_s(args.model, args.dtype, sizes, len(texts), args.max_tokens,
                              args.rounds * len(methods))
    for line in describe_plan(methods, skipped, texts, estimate, args.reuse_prompts,
                              args.rounds, args.interleave):
        print(line, flush=True)
    if args.plan:
        return

    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    plan = tokenize_plan(texts, tokenizer)
    all_prompts = [p for by_c in plan.values() for ps in by_c.values() for p in ps]
    cfg = eng.EngineConfig(model=model, dtype=args.dtype,
                           max_model_len=eng.model_len_for(all_prompts, tokenizer,
                                                           args.max_tokens,
                                                           max(args.concurrency)),
                           max_num_seqs=max(args.concurrency), seed=args.seed,
                           enforce_eager=args.enforce_eager,
                           async_scheduling=args.async_scheduling)
    params = eng.greedy(args.max_tokens, args.seed)
    accelerator = eng.accelerator_name(args.device)

    cells: list[Cell] = []
    method_info = []
    run_start = time.perf_counter()
    # Interleaved, a round's engines are loaded together, so that a cell's pair runs back to
    # back; otherwise each method has the machine to itself.
    runs = ([(r, round_order(methods, r)) for r in range(args.rounds)] if args.interleave
            else [(r, [m]) for r in range(args.rounds) for m in round_order(methods, r)])
    for number, (round_index, group) in enumerate(runs, 1):
        label = f"round {round_index + 1}/{args.rounds}, " if args.rounds > 1 else ""
        names = ", ".join(m.name for m in group)
        print(f"== {names} ({label}run {number}/{len(runs)})", flush=True)
        group_cells, infos = measure_together(group, cfg, plan, params, tokenizer, round_index)
        cells += group_cells
        method_info += infos
        elapsed = time.perf_counter() - run_start
        left = elapsed / number * (len(runs) - number)
        print(f"== {names} done; run {duration(elapsed)} so far, about {duration(left)} to go",
              flush=True)
        # Published after every run, so a run cut short keeps what it measured.
        complete = number == len(runs)
        try:
            publish(args, cells, run_meta(args, model, cfg, plan, method_info, skipped,
                                          accelerator, complete, estimate,
                                          time.perf_counter() - run_start))
        except Exception:
            if complete:
                raise
            # A report that fails on partial results must not stop the measurements.
            logging.exception("report of the partial results failed; measuring on")
    print((args.out / "results.md").read_text())
    print(f"results in {args.out}")


def publish(args: argparse.Namespace, cells: Sequence[Cell], meta: dict[str, Any]) -> None:
    """results.json, results.md and the plots under --out."""
    # Imported here so that the demo, which borrows from this module, needs no matplotlib.
    from benchmarks import report

    results = {"meta": meta, "cells": summaries(cells), "rounds": round_speedups(cells)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, args.out)


def run_meta(args: argparse.Namespace, model: Path, cfg: eng.EngineConfig,
             plan: Mapping[str, Mapping[int, Sequence[Any]]], method_info: list[dict[str, Any]],
             skipped: dict[str, str], accelerator: str | None, complete: bool,
             estimate_s: float | None, elapsed_s: float) -> dict[str, Any]:
    import vllm

    return {
        "model": args.model, "model_path": str(model), "dtype": args.dtype,
        "device": args.device, "accelerator": accelerator,
        "enforce_eager": args.enforce_eager, "async_scheduling": args.async_scheduling,
        "max_tokens": args.max_tokens, "seed": args.seed, "concurrency": args.concurrency,
        "k": args.k, "reuse_prompts": args.reuse_prompts, "rounds": args.rounds,
        "interleave": args.interleave,
        "prompts": {name: {str(c): len(p) for c, p in by_c.items()}
                    for name, by_c in plan.items()},
        "pooled_datasets": [d for d in plan if d not in RELATED_SETS],
        "prompt_file": str(args.prompts) if args.prompts is not None else None,
        "max_model_len": cfg.max_model_len, "quick": args.quick,
        "vllm": vllm.__version__, "host": platform.node(),
        "command": " ".join(["python -m benchmarks.run", *args.argv]),
        "date": datetime.now().isoformat(timespec="seconds"),
        "estimated_s": estimate_s, "elapsed_s": round(elapsed_s, 1),
        "methods": method_info, "unavailable": skipped, "complete": complete,
    }


if __name__ == "__main__":
    main()
