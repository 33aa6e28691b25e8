"""The performance table and plot of the main README, from the kept results folders.

    python -m benchmarks.summary [--results benchmarks/results] [--table docs/performance-table.md]
        [--plot docs/performance.png]

One row per workload x concurrency x target (model, dtype, device): lookahead's, suffix's and
ngram's speed-up over no speculation and tokens per target forward, where lookahead's accepted
tokens came from, the run's date and its results folder. A row takes its figures from one run,
paired rounds (`--rounds`) before single runs, then the run with the most of the three methods,
then the latest; a method that run did not measure comes from the latest other run of the same
row that did, marked, with lookahead's figures of that run beside it in a footnote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import MultipleLocator

from benchmarks.datasets import EXTRA_SETS, RELATED_SETS, UNRELATED_SETS
from benchmarks.labels import ALL_DATASETS, BASELINE

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lookahead", "suffix", "ngram")
GPU_NGRAM = "ngram_gpu"
"""vLLM's n-gram proposer on CUDA; the ngram column shows it where a run has it."""
FOUR_SETS = frozenset(UNRELATED_SETS)
EXTRA_KINDS = frozenset(EXTRA_SETS)
SOURCE_GROUPS: dict[str, tuple[str, ...]] = {
    "own text": ("prompt", "output"),
    "other requests": ("shared",),
    "Jacobi": ("trajectory", "jacobi"),
    "fill": ("fill",),
}
"""Lookahead's draft sources (as its stats name them) in the table's four groups."""
FILLED = "†"
TIMES = "\u00d7"
NO_FIGURE = "\u2013"
"""An en dash: no figure."""
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}
PLOT_NAMES = {"SmolLM2-135M": "SmolLM2", "Qwen2.5-Coder-1.5B": "Qwen-Coder-1.5B"}
"""Shorter names where the plot's labels take width from its bars."""
COLORS = {"lookahead": "C0", "suffix": "C1", "ngram": "C2"}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Which runs a row may take its figures from."""

    workload: str
    model: str
    dtype: str
    device: str
    concurrency: int
    datasets: frozenset[str]
    """The sets the run's pooled `all` row must pool, no more and no fewer."""


def _specs() -> tuple[RowSpec, ...]:
    cpu = [("smollm2-135m", "float32"), ("qwen2.5-coder-1.5b", "bfloat16")]
    rows = [RowSpec("four sets", model, dtype, "cpu", c, FOUR_SETS)
            for model, dtype in cpu for c in (1, 8, 32)]
    rows += [RowSpec("four sets", "smollm2-135m", "bfloat16", "cuda", c, FOUR_SETS)
             for c in (1, 8, 32)]
    rows += [RowSpec("extra kinds", "smollm2-135m", "float32", "cpu", c, EXTRA_KINDS)
             for c in (1, 8)]
    return tuple(rows)


ROWS = _specs()


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One results folder: its metadata and its cells by (method, dataset, concurrency)."""

    folder: str
    meta: Mapping[str, Any]
    cells: Mapping[tuple[str, str, int], Mapping[str, Any]]

    @property
    def rounds(self) -> int:
        return int(self.meta.get("rounds") or 1)

    @property
    def stamp(self) -> str:
        """When the run began, as the harness wrote it (ISO 8601, so it sorts)."""
        return str(self.meta["date"])

    @property
    def date(self) -> str:
        return self.stamp[:10]

    def pooled_sets(self) -> frozenset[str]:
        # Results written before the field existed pool every set but the related one.
        named = self.meta.get("pooled_datasets")
        if named is not None:
            return frozenset(named)
        return frozenset(d for _, d, _ in self.cells if d != ALL_DATASETS and d not in RELATED_SETS)

    def method_name(self, method: str) -> str:
        """The run's name for a column's method: on CUDA the ngram column is ngram_gpu."""
        if method == "ngram" and self.meta.get("device") == "cuda" and \
                any(m == GPU_NGRAM for m, _, _ in self.cells):
            return GPU_NGRAM
        return method

    def pooled(self, method: str, concurrency: int) -> Mapping[str, Any] | None:
        return self.cells.get((self.method_name(method), ALL_DATASETS, concurrency))


@dataclasses.dataclass(frozen=True)
class Figure:
    speedup: float
    tokens_per_forward: float
    run: Run


@dataclasses.dataclass(frozen=True)
class Row:
    spec: RowSpec
    run: Run | None
    """The run the row is taken from; None where no kept run matches."""
    figures: Mapping[str, Figure | None]
    sources: Mapping[str, float] | None
    """Shares of lookahead's accepted tokens per source group, where the run records them."""

    def filled(self, method: str) -> bool:
        """Whether the method's figures come from another run than the row's."""
        figure = self.figures.get(method)
        return figure is not None and figure.run is not self.run


# --- reading -----------------------------------------------------------------------------------

def read_run(path: Path) -> Run:
    data = json.loads(path.read_text())
    cells = {(c["method"], c["dataset"], int(c["concurrency"])): c for c in data["cells"]}
    return Run(path.parent.name, data["meta"], cells)


def load_runs(results: Path) -> list[Run]:
    """Every run the table may use: the harness's current design, complete and timed."""
    runs = [read_run(path) for path in sorted(results.glob("*/results.json"))]
    return [run for run in runs if _comparable(run)]


def _comparable(run: Run) -> bool:
    # Runs before the design of disjoint prompts per level lack `reuse_prompts`; their methods
    # drafted at other K and their caches were off, so they compare with nothing here.
    meta = run.meta
    return (meta.get("reuse_prompts") is False and not meta.get("quick")
            and meta.get("complete", True) and "date" in meta)


# --- choosing --------------------------------------------------------------------------------

def _matches(spec: RowSpec, run: Run) -> bool:
    meta = run.meta
    return ((meta["model"], meta["dtype"], meta["device"]) == (spec.model, spec.dtype, spec.device)
            and run.pooled_sets() == spec.datasets
            and run.pooled("lookahead", spec.concurrency) is not None
            and (BASELINE, ALL_DATASETS, spec.concurrency) in run.cells)


def _measured(run: Run, concurrency: int) -> int:
    return sum(run.pooled(m, concurrency) is not None for m in METHODS)


def _figure(run: Run, method: str, concurrency: int) -> Figure | None:
    cell = run.pooled(method, concurrency)
    if cell is None:
        return None
    return Figure(float(cell["speedup"]), float(cell["tokens_per_forward"]), run)


def source_shares(cell: Mapping[str, Any]) -> dict[str, float] | None:
    """Lookahead's accepted tokens per source group, as shares; None where not recorded or
    recorded under names the groups do not cover (older drafters named their sources otherwise)."""
    accepted = (cell.get("lookahead") or {}).get("accepted_by_source")
    if not accepted:
        return None
    known = {s for group in SOURCE_GROUPS.values() for s in group}
    total = sum(accepted.values())
    if total == 0 or any(n and s not in known for s, n in accepted.items()):
        return None
    return {group: sum(accepted.get(s, 0) for s in names) / total
            for group, names in SOURCE_GROUPS.items()}


def build_row(spec: RowSpec, runs: Sequence[Run]) -> Row:
    candidates = [run for run in runs if _matches(spec, run)]
    if not candidates:
        return Row(spec, None, dict.fromkeys(METHODS), None)
    # Paired rounds first: the one kind of run whose speed-ups survive this machine's drift.
    run = max(candidates,
              key=lambda r: (r.rounds > 1, _measured(r, spec.concurrency), r.stamp, r.folder))
    figures: dict[str, Figure | None] = {}
    for method in METHODS:
        figures[method] = _figure(run, method, spec.concurrency)
        if figures[method] is None:
            having = [r for r in candidates if r.pooled(method, spec.concurrency) is not None]
            if having:
                other = max(having, key=lambda r: (r.rounds > 1, r.stamp, r.folder))
                figures[method] = _figure(other, method, spec.concurrency)
    lookahead = run.pooled("lookahead", spec.concurrency)
    return Row(spec, run, figures, source_shares(lookahead) if lookahead else None)


def build_rows(runs: Sequence[Run], specs: Sequence[RowSpec] = ROWS) -> list[Row]:
    return [build_row(spec, runs) for spec in specs]


# --- the table -------------------------------------------------------------------------------

def target_label(spec: RowSpec, run: Run | None) -> str:
    model = MODEL_NAMES.get(spec.model, spec.model)
    dtype = DTYPE_NAMES.get(spec.dtype, spec.dtype)
    if spec.device == "cpu":
        return f"CPU, {model} {dtype}"
    accelerator = str((run.meta.get("accelerator") if run else None) or spec.device.upper())
    return f"{accelerator.removeprefix('NVIDIA ')}, {model} {dtype}"


def _cells(row: Row, key: str, spec: str, unit: str) -> list[str]:
    values = {m: getattr(f, key) for m, f in row.figures.items() if f is not None}
    # Only figures of one run compare: the machine's speed differs from run to run.
    own = [v for m, v in values.items() if not row.filled(m)]
    best = max(own) if len(own) > 1 else math.nan
    out = []
    for method in METHODS:
        if method not in values:
            out.append(NO_FIGURE)
        elif row.filled(method):
            out.append(f"{values[method]:{spec}}{unit}{FILLED}")
        else:
            text = f"{values[method]:{spec}}{unit}"
            out.append(f"**{text}**" if values[method] == best else text)
    return out


def _sources(row: Row) -> str:
    if row.sources is None:
        return NO_FIGURE
    return " / ".join(f"{round(100 * share)}" for share in row.sources.values()) + " %"


def _results_cell(row: Row) -> str:
    if row.run is None:
        return "not measured"
    rounds = f" ({row.run.rounds} paired rounds)" if row.run.rounds > 1 else ""
    return f"`{row.run.folder}`{rounds}"


HEADER = ("workload", "target", "c", *(f"{m} {TIMES}" for m in METHODS),
          *(f"{m} t/f" for m in METHODS),
          "lookahead accepted from " + " / ".join(SOURCE_GROUPS), "date", "results")


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    return [[row.spec.workload, target_label(row.spec, row.run), str(row.spec.concurrency),
             *_cells(row, "speedup", ".2f", TIMES), *_cells(row, "tokens_per_forward", ".2f", ""),
             _sources(row), row.run.date if row.run else NO_FIGURE, _results_cell(row)]
            for row in rows]


def _fill_notes(rows: Sequence[Row]) -> list[str]:
    notes = []
    for row in rows:
        for method in METHODS:
            figure = row.figures[method]
            if figure is None or not row.filled(method):
                continue
            ours = _figure(figure.run, "lookahead", row.spec.concurrency)
            beside = (f"; lookahead there {ours.speedup:.2f}{TIMES} at "
                      f"{ours.tokens_per_forward:.2f} tokens per forward" if ours else "")
            kind = f"{figure.run.rounds} paired rounds" if figure.run.rounds > 1 else "one run"
            notes.append(f"{FILLED} {target_label(row.spec, row.run)}, {row.spec.workload}, "
                         f"c={row.spec.concurrency}: {method} from `{figure.run.folder}` "
                         f"({figure.run.date}, {kind}), which the row's run did not measure"
                         f"{beside}.")
    return notes


NOISE = ("Speed-ups of the same code move by about ±10 % from run to run on this 2-core VM "
         "(its speed drifts while the methods run one after another), so a gap smaller than "
         "that is a tie unless it holds in every paired round; tokens per forward move far less.")


def _k_text(rows: Sequence[Row]) -> str:
    ks = sorted({int(f.run.meta["k"]) for r in rows for f in r.figures.values()
                 if f is not None and f.run.meta.get("k")})
    return "K = " + " or ".join(map(str, ks)) if ks else "the same K"


def markdown(rows: Sequence[Row]) -> str:
    lines = ["<!-- generated by `python -m benchmarks.summary` from benchmarks/results; "
             "rerun it rather than editing -->", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
             *("| " + " | ".join(r) + " |" for r in table_rows(rows)), ""]
    notes = [
        f"{TIMES}: output tokens/s over no speculation (`{BASELINE}`) in the same run; t/f: "
        "tokens generated per target forward, steps without a draft included; greedy, every "
        f"method drafting at most {_k_text(rows)} tokens a step; bold: the best of the methods "
        "the row's run measured. Four sets: MT-Bench, HumanEval, GSM8K and summarisation "
        "pooled; extra kinds: code-edit, extract, bullets and followup pooled, prompts that "
        "rework their own text, on which nothing was tuned. Results folders are under "
        "`benchmarks/results/`.",
        "Lookahead's accepted tokens by where the draft came from, in per cent: its own text "
        "(the prompt and its output so far), other requests (the cross-request corpus), the "
        "Jacobi trajectory and guesses, and random fill.",
    ]
    if any(r.run is not None and r.run.rounds > 1 for r in rows):
        notes.append("Rows from paired rounds (fresh engines each round, the methods' order "
                     "reversed every other round) give the figures pooled over the rounds; each "
                     "round's speed-up and their median are in the folder's `results.md`.")
    if any(r.run is not None and r.run.method_name("ngram") == GPU_NGRAM for r in rows):
        notes.append(f"On the GPU the ngram columns are vLLM's `{GPU_NGRAM}`.")
    notes += _fill_notes(rows)
    notes.append(NOISE)
    return "\n".join(lines + [line for note in notes for line in (note, "")])


# --- the plot --------------------------------------------------------------------------------

def plot(rows: Sequence[Row], path: Path) -> None:
    """Speed-up and tokens per forward per row, a bar per method; hatched: from another run."""
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(11, 0.45 * len(rows) + 1.4))
    height = 0.8 / len(METHODS)
    for ax, key, title in ((axes[0], "speedup", "speed-up over no speculation"),
                           (axes[1], "tokens_per_forward", "tokens per target forward")):
        for i, method in enumerate(METHODS):
            offsets = [y + (i - (len(METHODS) - 1) / 2) * height for y in range(len(rows))]
            values = [getattr(r.figures[method], key) if r.figures[method] else math.nan
                      for r in rows]
            bars = ax.barh(offsets, values, height, color=COLORS[method])
            for bar, row in zip(bars, rows, strict=True):
                if row.filled(method):
                    bar.set_hatch("///")
                    bar.set_edgecolor("white")
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=12)
        ax.tick_params(labelsize=11)
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_major_locator(MultipleLocator(0.5))
        _separate_groups(ax, rows)
    axes[0].set_yticks(range(len(rows)), [_plot_label(r) for r in rows])
    axes[0].invert_yaxis()
    handles = [Patch(color=COLORS[m], label=_legend_label(m, rows)) for m in METHODS]
    fig.legend(handles=handles, loc="upper center", ncol=len(METHODS), fontsize=11,
               frameon=False)
    fig.text(0.99, 0.005, "dashed: no speculation; hatched: from another run of the same row "
             "(see the table)", ha="right", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _plot_label(row: Row) -> str:
    kind = "" if row.spec.datasets == FOUR_SETS else f" {row.spec.workload}"
    rounds = f" ({row.run.rounds} rounds)" if row.run is not None and row.run.rounds > 1 else ""
    target = target_label(row.spec, row.run).replace(",", "")
    for long, short in PLOT_NAMES.items():
        target = target.replace(long, short)
    return f"{target} c={row.spec.concurrency}{kind}{rounds}"


def _legend_label(method: str, rows: Sequence[Row]) -> str:
    gpu = any(r.run is not None and r.run.method_name(method) != method for r in rows)
    return f"{method} ({GPU_NGRAM} on the GPU)" if gpu else method


def _separate_groups(ax: Any, rows: Sequence[Row]) -> None:
    for y in range(1, len(rows)):
        before, after = rows[y - 1].spec, rows[y].spec
        if (before.model, before.dtype, before.device, before.datasets) != \
                (after.model, after.dtype, after.device, after.datasets):
            ax.axhline(y - 0.5, color="grey", linewidth=0.8)


# --- command line ----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "performance-table.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows = build_rows(load_runs(args.results))
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(markdown(rows))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot)
    missing = [r for r in rows if r.run is None]
    print(f"{args.table}: {len(rows)} rows ({len(missing)} not measured); {args.plot}")


if __name__ == "__main__":
    main()
