"""A benchmark's measured cells, and the figures the report prints from them: per cell, pooled
over the sets, and per paired round."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import engine as eng
from benchmarks.datasets import RELATED_SETS
from benchmarks.labels import ALL_DATASETS, BASELINE


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
