"""The README's performance table and plot (`benchmarks.summary`), on small results folders shaped
like the harness's, and on the kept results themselves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import summary

FOUR_SETS = sorted(summary.FOUR_SETS)
X = summary.TIMES
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _cell(method: str, concurrency: int, speedup: float, tokens_per_forward: float,
          sources: dict[str, int] | None) -> dict[str, Any]:
    cell: dict[str, Any] = {"method": method, "dataset": "all", "concurrency": concurrency,
                            "prompts": 16, "speedup": speedup,
                            "tokens_per_forward": tokens_per_forward,
                            "equality": {"differing_prompts": 0}}
    if sources is not None:
        cell["lookahead"] = {"propose_ms_per_step": 0.2, "accepted_by_source": sources,
                             "drafted_by_source": {s: 2 * n for s, n in sources.items()}}
    return cell


def write_run(results: Path, folder: str, methods: dict[str, tuple[float, float]], *,
              concurrency: int = 1, rounds: int = 1, date: str = "2026-12-04T10:00:00",
              model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu",
              datasets: list[str] | None = None, **meta: Any) -> None:
    """A results.json as the harness writes it, with only the pooled cells the table reads."""
    sources = {"prompt": 50, "output": 20, "shared": 20, "trajectory": 6, "jacobi": 4, "fill": 0}
    cells = [_cell("none", concurrency, 1.0, 1.0, None)]
    cells += [_cell(name, concurrency, speedup, tf, sources if name == "lookahead" else None)
              for name, (speedup, tf) in methods.items()]
    meta = {"model": model, "dtype": dtype, "device": device, "accelerator": None, "k": 8,
            "reuse_prompts": False, "rounds": rounds, "quick": False, "complete": True,
            "date": date, "pooled_datasets": datasets or FOUR_SETS, **meta}
    (results / folder).mkdir(parents=True)
    (results / folder / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}))


ONE_ROW = (summary.RowSpec("four sets", "smollm2-135m", "float32", "cpu", 1, summary.FOUR_SETS),)


def test_paired_rounds_win_and_a_missing_rival_comes_marked_from_the_latest_single_run(tmp_path):
    write_run(tmp_path, "single-old", {"lookahead": (1.1, 1.4), "suffix": (1.0, 1.3),
                                       "ngram": (0.9, 1.2)}, date="2026-12-01T10:00:00")
    write_run(tmp_path, "single-new", {"lookahead": (1.4, 1.5), "suffix": (1.2, 1.4),
                                       "ngram": (1.19, 1.33)}, date="2026-12-05T10:00:00")
    write_run(tmp_path, "rounds", {"lookahead": (1.34, 1.53), "suffix": (1.24, 1.42)},
              rounds=3, date="2026-12-04T10:00:00")
    [row] = summary.build_rows(summary.load_runs(tmp_path), ONE_ROW)
    assert row.run is not None and row.run.folder == "rounds"
    assert {m: (f.speedup, f.run.folder) for m, f in row.figures.items() if f} == {
        "lookahead": (1.34, "rounds"), "suffix": (1.24, "rounds"), "ngram": (1.19, "single-new")}
    assert row.filled("ngram") and not row.filled("suffix")
    text = summary.markdown([row])
    assert f"| **1.34{X}** | 1.24{X} | 1.19{X}{summary.FILLED} |" in text
    assert "`rounds` (3 paired rounds)" in text
    assert "ngram from `single-new` (2026-12-05, one run)" in text
    assert f"lookahead there 1.40{X} at 1.50 tokens per forward" in text
    assert "pooled over the rounds" in text and summary.NOISE in text


def test_the_run_with_more_rivals_wins_among_single_runs(tmp_path):
    write_run(tmp_path, "later-fewer", {"lookahead": (1.0, 1.3)}, date="2026-12-05T10:00:00")
    write_run(tmp_path, "earlier-all", {"lookahead": (1.1, 1.4), "suffix": (1.0, 1.3),
                                        "ngram": (0.9, 1.2)}, date="2026-12-04T10:00:00")
    [row] = summary.build_rows(summary.load_runs(tmp_path), ONE_ROW)
    assert row.run is not None and row.run.folder == "earlier-all"
    assert not any(row.filled(m) for m in summary.METHODS)


def test_runs_of_other_targets_workloads_and_designs_are_left_out(tmp_path):
    methods = {"lookahead": (1.5, 1.6), "suffix": (1.0, 1.3), "ngram": (0.9, 1.2)}
    write_run(tmp_path, "two-sets", methods, datasets=["gsm8k", "humaneval"])
    write_run(tmp_path, "bf16", methods, dtype="bfloat16")
    write_run(tmp_path, "c8", methods, concurrency=8)
    write_run(tmp_path, "old-design", methods, reuse_prompts=True)
    write_run(tmp_path, "quick", methods, quick=True)
    write_run(tmp_path, "cut-short", methods, complete=False)
    [row] = summary.build_rows(summary.load_runs(tmp_path), ONE_ROW)
    assert row.run is None and all(f is None for f in row.figures.values())
    assert "not measured" in summary.markdown([row])


def test_on_a_gpu_the_ngram_column_is_ngram_gpu(tmp_path):
    write_run(tmp_path, "h200", {"lookahead": (1.11, 1.91), "suffix": (0.39, 1.76),
                                 "ngram": (0.5, 1.5), "ngram_gpu": (0.38, 1.61)},
              device="cuda", dtype="bfloat16", accelerator="NVIDIA H200")
    spec = summary.RowSpec("four sets", "smollm2-135m", "bfloat16", "cuda", 1, summary.FOUR_SETS)
    [row] = summary.build_rows(summary.load_runs(tmp_path), (spec,))
    assert row.figures["ngram"] is not None and row.figures["ngram"].speedup == 0.38
    assert summary.target_label(spec, row.run) == "H200, SmolLM2-135M bf16"
    assert "vLLM's `ngram_gpu`" in summary.markdown([row])


def test_accepted_tokens_are_grouped_by_where_the_draft_came_from():
    cell = {"lookahead": {"accepted_by_source": {"prompt": 50, "output": 20, "shared": 20,
                                                 "trajectory": 6, "jacobi": 4, "fill": 0}}}
    assert summary.source_shares(cell) == {"own text": 0.7, "other requests": 0.2,
                                           "Jacobi": 0.1, "fill": 0.0}
    # Older drafters named their sources otherwise: no shares rather than wrong ones.
    assert summary.source_shares({"lookahead": {"accepted_by_source": {"chained": 3}}}) is None
    assert summary.source_shares({}) is None


def test_the_command_writes_the_table_and_the_plot(tmp_path):
    results = tmp_path / "results"
    write_run(results, "run", {"lookahead": (1.4, 1.5), "suffix": (1.2, 1.4),
                               "ngram": (1.19, 1.33)})
    table, png = tmp_path / "docs" / "table.md", tmp_path / "docs" / "plot.png"
    summary.main(["--results", str(results), "--table", str(table), "--plot", str(png)])
    lines = table.read_text().splitlines()
    row = next(line for line in lines if "`run`" in line)
    assert row.startswith(f"| four sets | CPU, SmolLM2-135M fp32 | 1 | **1.40{X}** |")
    assert "| 70 / 20 / 10 / 0 % | 2026-12-04 |" in row
    assert png.read_bytes().startswith(b"\x89PNG")


def test_every_row_of_the_kept_results_has_its_figures_and_the_docs_show_them():
    rows = summary.build_rows(summary.load_runs(RESULTS))
    assert len(rows) == len(summary.ROWS)
    for row in rows:
        label = f"{summary.target_label(row.spec, row.run)} c={row.spec.concurrency}"
        assert row.run is not None, label
        assert all(row.figures[m] is not None for m in summary.METHODS), label
        assert row.sources is not None, label
    for line in summary.table_rows(rows):
        assert summary.NO_FIGURE not in line, line
    # The committed table is what the kept results give, and the README shows its rows.
    generated = summary.markdown(rows)
    assert (ROOT / "docs" / "performance-table.md").read_text() == generated
    readme = (ROOT / "README.md").read_text()
    for line in generated.splitlines():
        if line.startswith(("| four sets |", "| extra kinds |")):
            assert line in readme, line
