"""results.md and PNG plots from the harness's results (the dict written as results.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt

from benchmarks.run import ALL_DATASETS as ALL
from benchmarks.run import BASELINE

SOURCES = ("candidate_prompt", "candidate_output", "candidate_trajectory", "chained", "jacobi",
           "fill")
_POSITIONS_SHOWN = 8
Row = dict[str, Any]


def write(results: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    plot_per_dataset(results["cells"], out / "per_dataset.png")
    plot_concurrency(results["cells"], out / "concurrency.png")


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(results: dict[str, Any]) -> str:
    meta, cells = results["meta"], results["cells"]
    lines = [
        "# Speculative decoding benchmark", "",
        f"Model `{meta['model']}`, {meta['dtype']}, {meta['device']}"
        f"{_accelerator(meta)}{' (eager)' if meta['enforce_eager'] else ''}, "
        f"vLLM {meta['vllm']}, greedy (seed {meta['seed']}), at most {meta['max_tokens']} new "
        f"tokens, {meta['date']} on {meta['host']}.",
        "Prompts: " + ", ".join(f"{k} {v}" for k, v in meta["prompts"].items())
        + f". Concurrency {', '.join(map(str, meta['concurrency']))}: closed loop, that many "
        "requests in flight; latency from a request's submission to its last token.",
        "Methods (K = draft tokens verified per step at most):", "",
        *(f"- `{m['name']}`: {m['speculative_config'] or 'no speculation'}, K="
          f"{m['num_speculative_tokens'] or 0}, async scheduling "
          f"{'on' if m['async_scheduling'] else 'off'}, engine start {m['engine_start_s']} s"
          for m in meta["methods"]),
        "",
    ]
    fewest = min(meta["prompts"].values())
    if fewest < max(meta["concurrency"]):
        lines.append(f"A set of {fewest} prompts never has more than {fewest} requests in flight, "
                     "whatever c says.")
    lines += [f"**{name}: unavailable ({why})**" for name, why in meta["unavailable"].items()]
    if not meta.get("complete", True):
        lines.append("**Incomplete: the run stopped before every method was measured.**")
    if meta["quick"]:
        lines.append("**Quick smoke run of the harness: tiny random model, timings mean nothing.**")
    lines += ["", *_throughput(cells), "", *_per_position(cells), "", *_lookahead(cells), "",
              *_equality(cells, meta["dtype"]), ""]
    return "\n".join(lines)


def _accelerator(meta: dict[str, Any]) -> str:
    # Results written before the field existed have none.
    name = meta.get("accelerator")
    return f" ({name})" if name else ""


def _throughput(cells: Sequence[Row]) -> list[str]:
    rows = [[c["method"], c["dataset"], str(c["concurrency"]), _num(c["tokens_per_s"], ".1f"),
             _num(c["speedup"]), _num(c["tokens_per_forward"]), _num(c["mean_acceptance_length"]),
             _num(c["acceptance_rate"], ".1%"), _num(c["latency_p50_s"]),
             _num(c["latency_p90_s"]), str(c["equality"]["differing_prompts"])]
            for c in _ordered(cells)]
    return ["## Throughput and acceptance", "",
            *_table(["method", "dataset", "c", "tok/s", "x none", "tok/forward", "mean acc. len",
                     "acc. rate", "p50 s", "p90 s", "≠ none"], rows), "",
            "tok/forward = generated tokens / target forwards, the forwards counted per request "
            "from vLLM's per-step outputs, steps without a draft included. (generated / "
            "(generated - accepted) overstates it: vLLM also counts drafts accepted past the "
            "stop and then trimmed.) mean acc. len = 1 + accepted / drafts (vLLM's figure, over "
            "steps that drafted). acc. rate = accepted / drafted tokens. ≠ none: prompts whose "
            "token ids differ from `none`'s."]


def _per_position(cells: Sequence[Row]) -> list[str]:
    pooled = [c for c in _ordered(cells) if c["dataset"] == ALL and c["per_position_acceptance"]]
    if not pooled:
        return []
    width = min(_POSITIONS_SHOWN, max(len(c["per_position_acceptance"]) for c in pooled))
    rows = [[c["method"], str(c["concurrency"]),
             *(_num(p, ".0%") for p in c["per_position_acceptance"][:width]),
             *("" for _ in range(width - len(c["per_position_acceptance"])))] for c in pooled]
    return ["## Acceptance by draft position (all datasets)", "",
            *_table(["method", "c", *map(str, range(1, width + 1))], rows), "",
            "Share of drafts whose token at that position was accepted."]


def _lookahead(cells: Sequence[Row]) -> list[str]:
    ours = [c for c in _ordered(cells) if "lookahead" in c]
    if not ours:
        return []
    rows = []
    for c in ours:
        la = c["lookahead"]
        rows.append([c["method"], c["dataset"], str(c["concurrency"]),
                     _num(la["propose_ms_per_step"]), _num(la["propose_share_of_wall"], ".1%"),
                     _num(la["pool_max_per_request"], ".0f"),
                     *(str(la["accepted_by_source"][s]) for s in SOURCES)])
    return ["## Lookahead proposer", "",
            *_table(["method", "dataset", "c", "propose ms/step", "of wall", "pool max/request",
                     *(f"acc. {s.removeprefix('candidate_')}" for s in SOURCES)], rows), "",
            "pool max/request: most n-gram continuations held per live request, sampled about "
            "once a second while requests ran (- if no sample fell in). acc.: accepted draft "
            "tokens by what proposed them (pool candidates from prompt, output or Jacobi "
            "trajectory, candidates chained after them, Jacobi guesses, random fill)."]


def _equality(cells: Sequence[Row], dtype: str) -> list[str]:
    compared = [c for c in _ordered(cells) if c["method"] != BASELINE and c["dataset"] != ALL]
    differing = [c for c in compared if c["equality"]["differing_prompts"]]
    if dtype != "float32":
        pooled = [c for c in _ordered(cells) if c["method"] != BASELINE and c["dataset"] == ALL]
        rows = [[c["method"], str(c["concurrency"]), _num(c["equality"]["divergence_rate"], ".0%"),
                 f"{c['equality']['differing_prompts']}/{c['prompts']}"] for c in pooled]
        return [f"## Divergence from `none` ({dtype})", "",
                f"In {dtype}, verifying several positions in one forward rounds differently from "
                "one position at a time, so greedy choices at near-ties can flip; divergence here "
                "is expected and is not an exactness failure.", "",
                *_table(["method", "c", "divergence rate", "prompts"], rows)]
    if not differing:
        return ["## Output equality vs `none`", "",
                f"All {len(compared)} method x dataset x concurrency cells produced token ids "
                "identical to `none`."]
    rows = [[c["method"], c["dataset"], str(c["concurrency"]),
             f"{c['equality']['differing_prompts']}/{c['prompts']}",
             ", ".join(f"#{d['prompt']}@{d['position']}"
                       for d in c["equality"]["first_differences"])]
            for c in differing]
    return ["## Output equality vs `none`", "",
            "**Greedy float32 outputs differ from `none`** (prompt #index @ first differing "
            "output token):", "", *_table(["method", "dataset", "c", "prompts", "where"], rows)]


def _ordered(cells: Sequence[Row]) -> list[Row]:
    """By concurrency, dataset (pooled last), then method in run order."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    datasets = [*dict.fromkeys(c["dataset"] for c in cells if c["dataset"] != ALL), ALL]
    return sorted(cells, key=lambda c: (c["concurrency"], datasets.index(c["dataset"]),
                                        methods.index(c["method"])))


def _colors(cells: Sequence[Row]) -> dict[str, str]:
    """One colour per method in every plot."""
    return {m: f"C{i}" for i, m in enumerate(dict.fromkeys(c["method"] for c in cells))}


def plot_per_dataset(cells: Sequence[Row], path: Path) -> None:
    colors = _colors(cells)
    concurrencies = sorted({c["concurrency"] for c in cells})
    metrics: list[tuple[str, str]] = [("tokens_per_forward", "tokens per target forward"),
                                      ("speedup", "speed-up vs none")]
    fig, axes = plt.subplots(len(metrics), len(concurrencies), squeeze=False,
                             figsize=(5 + 3 * len(concurrencies), 7))
    for col, concurrency in enumerate(concurrencies):
        here = [c for c in _ordered(cells) if c["concurrency"] == concurrency]
        for row, (key, label) in enumerate(metrics):
            _grouped_bars(axes[row][col], here, key, colors)
            axes[row][col].set_ylabel(label)
            axes[row][col].set_title(f"concurrency {concurrency}")
    # Results published after the baseline alone have no bars to label yet.
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grouped_bars(ax: Any, cells: Sequence[Row], key: str, colors: dict[str, str]) -> None:
    """Bars per dataset, one per method; `none` is the dashed line at 1."""
    methods = list(dict.fromkeys(c["method"] for c in cells if c["method"] != BASELINE))
    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        by_dataset = {c["dataset"]: c[key] for c in cells if c["method"] == method}
        ax.bar([d + (i - (len(methods) - 1) / 2) * width for d in range(len(datasets))],
               [by_dataset.get(d, math.nan) for d in datasets], width, label=method,
               color=colors[method])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(datasets)), datasets, rotation=20)


def plot_concurrency(cells: Sequence[Row], path: Path) -> None:
    pooled = [c for c in cells if c["dataset"] == ALL]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in _colors(cells).items():
        points = sorted((c["concurrency"], c["speedup"]) for c in pooled if c["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", label=method, color=color,
                linestyle="--" if method == BASELINE else "-")
    concurrencies = sorted({c["concurrency"] for c in pooled})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.minorticks_off()
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("speed-up vs none (output tokens/s, all datasets)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
