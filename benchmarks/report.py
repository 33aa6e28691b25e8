"""results.md and PNG plots from the harness's results (the dict written as results.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt

from benchmarks.labels import ALL_DATASETS as ALL
from benchmarks.labels import BASELINE, CONTROL

SOURCES = ("candidate_prompt", "candidate_output", "candidate_trajectory", "chained", "jacobi",
           "fill")
_POSITIONS_SHOWN = 8
_POSITIONS_MAX = 16
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
        f"tokens, {meta['date']} on {meta['host']}"
        + (f", {_duration(meta['elapsed_s'])} in all" if meta.get("elapsed_s") else "") + ".",
        *([f"Command: `{meta['command']}`."] if meta.get("command") else []),
        "Prompts per set: " + _prompt_counts(meta) + ". Concurrency "
        f"{', '.join(map(str, meta['concurrency']))}: closed loop, that many requests in flight; "
        "latency from a request's submission to its last token.",
        _design(meta), "",
        "Methods (K = draft tokens verified per step at most):", "",
        *(f"- `{m['name']}`{_round_label(m, meta)}: "
          f"{m['speculative_config'] or 'no speculation'}, K="
          f"{m['num_speculative_tokens'] or 0}, async scheduling "
          f"{'on' if m['async_scheduling'] else 'off'}, engine start {m['engine_start_s']} s"
          + (f", {_duration(m['elapsed_s'])} in all" if m.get("elapsed_s") else "")
          for m in meta["methods"]),
        "",
    ]
    lines += _few_prompts(meta)
    lines += [f"**{name}: not run ({why})**" for name, why in meta["unavailable"].items()]
    if not meta.get("complete", True):
        lines.append("**Incomplete: the run stopped before every method was measured.**")
    if meta["quick"]:
        lines.append("**Quick smoke run of the harness: tiny random model, timings mean nothing.**")
    lines += ["", *_summary(cells, meta), "",
              *_rounds(results.get("rounds", []), meta.get("interleave", False)), "",
              *_versus(cells), "", *_throughput(cells), "",
              *_per_position(cells, meta), "", *_lookahead(cells), "",
              *_equality(cells, meta["dtype"]), ""]
    return "\n".join(lines)


def _round_label(method: dict[str, Any], meta: dict[str, Any]) -> str:
    rounds = meta.get("rounds", 1)
    return f" (round {method['round'] + 1}/{rounds})" if rounds > 1 else ""


def _accelerator(meta: dict[str, Any]) -> str:
    # Results written before the field existed have none.
    name = meta.get("accelerator")
    return f" ({name})" if name else ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else \
        f"{minutes}:{secs:02d}"


def _prompt_counts(meta: dict[str, Any]) -> str:
    def sizes(value: Any) -> str:
        # Results written before each concurrency had its own prompts hold one count per set.
        if isinstance(value, int):
            return str(value)
        return "/".join(str(n) for n in value.values())

    label = "/".join(f"c={c}" for c in meta["concurrency"])
    return ", ".join(f"{name} {sizes(v)}" for name, v in meta["prompts"].items()) + \
        f" (at {label})"


def _design(meta: dict[str, Any]) -> str:
    pooled = meta.get("pooled_datasets")
    pooled_text = (f"`{ALL}` pools {', '.join(pooled)}; sets of related requests are reported "
                   "on their own. " if pooled is not None else "")
    if "reuse_prompts" not in meta:
        return ("Written by the harness before each concurrency had its own prompts: every "
                "concurrency replayed the same prompts.")
    if meta["reuse_prompts"]:
        return (pooled_text + "**Old design (--reuse-prompts)**: every concurrency replays the "
                "same first prompts; suffix's global cache of earlier responses and lookahead's "
                "pool shared across requests (where the plugin has one) are off, so that they "
                "cannot recall them.")
    return (pooled_text + "Each concurrency sends its own prompts, disjoint from the other "
            "levels' (the same for every method), and warm-up its own, so no prompt reaches an "
            "engine twice: cross-request caches run at their defaults (suffix keeps its global "
            "cache of earlier responses) and can only recall other requests' answers. An "
            "engine's caches carry over from cell to cell, in the order of the tables.")


def _few_prompts(meta: dict[str, Any]) -> list[str]:
    notes = []
    for name, value in meta["prompts"].items():
        counts = value if isinstance(value, dict) else {str(c): value for c in meta["concurrency"]}
        notes += [f"{name} at c={c} has only {n} prompts: at most {n} requests in flight."
                  for c, n in counts.items() if n < int(c)]
    return notes


def _num_or_na(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else _num(value, spec)


def _summary(cells: Sequence[Row], meta: dict[str, Any]) -> list[str]:
    methods = list(dict.fromkeys(c["method"] for c in cells))
    concurrencies = sorted({c["concurrency"] for c in cells})
    datasets = list(dict.fromkeys(c["dataset"] for c in cells if c["dataset"] != ALL))
    first = concurrencies[0]
    ks = {m["name"]: m["num_speculative_tokens"] or 0 for m in meta["methods"]}
    index = {(c["method"], c["dataset"], c["concurrency"]): c for c in cells}

    def pooled(method: str, concurrency: int) -> str:
        cell = index.get((method, ALL, concurrency))
        if cell is None:
            return "-"
        if method == BASELINE:
            return f"{_num(cell['tokens_per_s'], '.1f')} tok/s"
        full = cell.get("full_batch_speedup") if concurrency > 1 else None
        return (f"{_num(cell['tokens_per_forward'])}, {_num(cell['speedup'])}x"
                + (f" (full {_num(full)}x)" if full is not None else ""))

    def per_set(method: str, dataset: str) -> str:
        cell = index.get((method, dataset, first))
        return "-" if cell is None else _num(cell["tokens_per_forward"])

    rows = [[m, str(ks.get(m, "?")), *(pooled(m, c) for c in concurrencies),
             *(per_set(m, d) for d in datasets)] for m in methods]
    return ["## Summary", "",
            *_table(["method", "K", *(f"{ALL}, c={c}: t/f, x" for c in concurrencies),
                     *(f"{d} t/f, c={first}" for d in datasets)], rows), "",
            f"t/f = generated tokens per target forward; x = output tokens/s over `{BASELINE}`'s "
            f"in the same cells (`{BASELINE}`'s own row gives its tokens/s); full: the same over "
            "the engine steps that began with a full batch, without the stream's ramps. "
            f"`{ALL}` pools the sets named in the header's note."]


def _rounds(rows: Sequence[Row], interleaved: bool = False) -> list[str]:
    """Each round's speed-up over `none` of the same round, and how often each method led."""
    if not rows:
        return []
    count = len(rows[0]["speedups"])
    firsts: dict[tuple[str, int, str], int] = {}
    for concurrency, dataset in dict.fromkeys((r["concurrency"], r["dataset"]) for r in rows):
        rivals = [r for r in rows if (r["concurrency"], r["dataset"]) == (concurrency, dataset)
                  and r["method"] != CONTROL]
        if not rivals:
            continue
        for i in range(count):
            best = max(rivals, key=lambda r: r["speedups"][i])
            key = (best["method"], concurrency, dataset)
            firsts[key] = firsts.get(key, 0) + 1
    table = [[row["method"], str(row["concurrency"]), row["dataset"],
              *(_num(x) for x in row["speedups"]), f"**{_num(row['median'])}**",
              f"{sum(x > 1.0 for x in row['speedups'])}/{count}",
              "-" if row["method"] == CONTROL else
              f"{firsts.get((row['method'], row['concurrency'], row['dataset']), 0)}/{count}"]
             for row in sorted(rows, key=lambda row: (row["concurrency"], row["dataset"]))]
    return ["## Rounds", "",
            *_table(["method", "c", "dataset", *(f"round {r + 1}" for r in range(count)),
                     "median", f"above `{BASELINE}`", "first"], table), "",
            ("Each round loaded every method's engine afresh, all at once, and ran each cell with "
             "every method in turn, the order reversed from cell to cell"
             if interleaved else
             "Each round ran every method on a fresh engine over the same prompts, the order "
             "reversed every other round")
            + f"; a round's figure is output tokens/s over `{BASELINE}`'s "
            "in the same round. above: rounds faster than it; first: rounds in which the method "
            "was the fastest of those drafting."
            + (f" `{CONTROL}`: a second engine without speculation (an A/A control), so its "
               "rounds show how far from 1.00 this run's ratios stray by chance."
               if any(row["method"] == CONTROL for row in rows) else "")]


VERSUS = "lookahead"
EQUAL_K_RIVALS = ("ngram", "suffix", "ngram_gpu")
TARGET_RATIO = 1.25


def _versus(cells: Sequence[Row]) -> list[str]:
    """Lookahead's tokens per forward over the best of ngram and suffix at the same K."""
    index = {(c["method"], c["dataset"], c["concurrency"]): c for c in cells}
    rivals = [m for m in EQUAL_K_RIVALS if any(c["method"] == m for c in cells)]
    if not rivals or not any(c["method"] == VERSUS for c in cells):
        return []
    datasets = [*dict.fromkeys(c["dataset"] for c in cells if c["dataset"] != ALL)]
    if any(c["dataset"] == ALL for c in cells):
        datasets.append(ALL)
    rows = []
    for concurrency in sorted({c["concurrency"] for c in cells}):
        row = [str(concurrency)]
        for dataset in datasets:
            ours = index.get((VERSUS, dataset, concurrency))
            theirs = [(index[(m, dataset, concurrency)]["tokens_per_forward"], m) for m in rivals
                      if (m, dataset, concurrency) in index]
            if ours is None or not theirs:
                row.append("-")
                continue
            best, name = max(theirs)
            ratio = ours["tokens_per_forward"] / best
            row.append(f"{'**' if ratio >= TARGET_RATIO else ''}{_num(ratio)}"
                       f"{'**' if ratio >= TARGET_RATIO else ''} ({name})")
        rows.append(row)
    return [f"## `{VERSUS}` vs the best of {', '.join(f'`{m}`' for m in rivals)} at equal K", "",
            *_table(["c", *datasets], rows), "",
            f"`{VERSUS}`'s tokens per target forward over the highest of the others' (named) in "
            f"the same cell; bold where at least {TARGET_RATIO}."]


def _throughput(cells: Sequence[Row]) -> list[str]:
    rows = []
    for c in _ordered(cells):
        la = c.get("lookahead")
        rows.append([c["method"], c["dataset"], str(c["concurrency"]), str(c["prompts"]),
                     _num(c["tokens_per_s"], ".1f"), _num(c["speedup"]),
                     _num_or_na(c.get("full_batch_speedup")),
                     _num_or_na(c.get("full_batch_share"), ".0%"),
                     _num(c["tokens_per_forward"]), _num(c["mean_acceptance_length"]),
                     _num(c["acceptance_rate"], ".1%"), _num(c["latency_p50_s"]),
                     _num(c["latency_p90_s"]), _num(c.get("step_ms"), ".1f"),
                     _num_or_na(la and la["propose_ms_per_step"]),
                     _num_or_na(la and la["propose_share_of_wall"], ".1%"),
                     str(c["equality"]["differing_prompts"])])
    return ["## Throughput and acceptance", "",
            *_table(["method", "dataset", "c", "prompts", "tok/s", "x none", "x none (full)",
                     "full %", "tok/forward",
                     "mean acc. len", "acc. rate", "p50 s", "p90 s", "step ms",
                     "propose ms/step", "propose % of wall", "≠ none"], rows), "",
            "x none (full): the speed-up over the engine steps that began with a full batch "
            "(`c` requests in flight), leaving out the stream's ramps at its start and end; "
            "full %: those steps' share of the cell's wall time. "
            "tok/forward = generated tokens / target forwards, the forwards counted per request "
            "from vLLM's per-step outputs, steps without a draft included. (generated / "
            "(generated - accepted) overstates it: vLLM also counts drafts accepted past the "
            "stop and then trimmed.) mean acc. len = 1 + accepted / drafts (vLLM's figure, over "
            "steps that drafted). acc. rate = accepted / drafted tokens. step ms = wall time / "
            "engine steps with output. propose: the drafter's own time per engine step and its "
            "share of wall time, from lookahead's stats (n/a: vLLM's methods report none). "
            "≠ none: prompts whose token ids differ from `none`'s."]


def _per_position(cells: Sequence[Row], meta: dict[str, Any]) -> list[str]:
    drafted = [c for c in _ordered(cells) if c["per_position_acceptance"]]
    if not drafted:
        return []
    longest = max(len(c["per_position_acceptance"]) for c in drafted)
    width = min(longest, max(_POSITIONS_SHOWN, meta.get("k") or 0), _POSITIONS_MAX)
    beyond = longest > width

    def row(c: Row) -> list[str]:
        shares = c["per_position_acceptance"]
        rest = shares[width:]
        return [c["method"], c["dataset"], str(c["concurrency"]),
                *(_num(p, ".0%") for p in shares[:width]),
                *("" for _ in range(width - len(shares[:width]))),
                *([_num(sum(rest) / len(rest), ".0%") if rest else ""] if beyond else [])]

    return ["## Acceptance by draft position", "",
            *_table(["method", "dataset", "c", *map(str, range(1, width + 1)),
                     *([f"{width + 1}-{longest} (mean)"] if beyond else [])],
                    [row(c) for c in drafted]), "",
            "Share of drafts whose token at that position was accepted."]


def _cost_fit(fit: Sequence[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in fit) if fit else "-"


def _lookahead(cells: Sequence[Row]) -> list[str]:
    ours = [c for c in _ordered(cells) if "lookahead" in c]
    if not ours:
        return []
    # The drafter names its sources; older results use the names in SOURCES.
    sources = list(dict.fromkeys(s for c in ours for s in c["lookahead"]["accepted_by_source"]))
    rows = []
    for c in ours:
        la = c["lookahead"]
        rows.append([c["method"], c["dataset"], str(c["concurrency"]),
                     _num(la["propose_ms_per_step"]), _num(la["propose_share_of_wall"], ".1%"),
                     _num(la["pool_max_per_request"], ".0f"),
                     _cost_fit(la.get("step_cost_fit_ms")),
                     _num(la.get("greedy_calibration")),
                     *(f"{la['accepted_by_source'].get(s, 0)}/{la['drafted_by_source'].get(s, 0)}"
                       for s in sources)])
    return ["## Lookahead proposer", "",
            *_table(["method", "dataset", "c", "propose ms/step", "of wall", "pool max/request",
                     "step cost fit a / b / c ms", "calibration",
                     *(s.removeprefix("candidate_") for s in sources)], rows), "",
            "pool max/request: most n-gram continuations held per live request, sampled about "
            "once a second while requests ran (- if no sample fell in). step cost fit: the "
            "step-cost model at the last sample, ms per step (a), per row (b) and per verified "
            "token (c); the cut keeps a draft token of reach q while q times the step's cost "
            "exceeds c times its expected tokens. calibration: greedy requests' realized over "
            "expected acceptances at the last sample, which prices their chains where it is "
            "below 1. Per source (as the "
            "drafter names them: the prompt, the request's output, other requests' outputs, "
            "the Jacobi trajectory or guesses, random fill): accepted / drafted tokens."]


def _equality(cells: Sequence[Row], dtype: str) -> list[str]:
    compared = [c for c in _ordered(cells) if c["method"] != BASELINE and c["dataset"] != ALL]
    differing = [c for c in compared if c["equality"]["differing_prompts"]]
    if dtype != "float32":
        totals: dict[tuple[str, int], list[int]] = {}
        for c in compared:
            total = totals.setdefault((c["method"], c["concurrency"]), [0, 0])
            total[0] += c["equality"]["differing_prompts"]
            total[1] += c["prompts"]
        rows = [[method, str(concurrency), _num(n / of, ".0%"), f"{n}/{of}"]
                for (method, concurrency), (n, of) in totals.items()]
        return [f"## Divergence from `none` ({dtype})", "",
                f"In {dtype}, verifying several positions in one forward rounds differently from "
                "one position at a time, so greedy choices at near-ties can flip; divergence here "
                "is expected and is not an exactness failure. Prompts of every set:", "",
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
