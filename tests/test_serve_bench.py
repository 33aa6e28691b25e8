"""`benchmarks/serve_bench.sh`, the benchmark through vLLM's own client: its plan and its table
without a server, and the whole script once against real servers on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import methods
from tests.conftest import write_jsonl


def _bench_result(method, concurrency, throughput, **extra):
    """A result file as vLLM 0.32's `bench serve --save-result` writes it (benchmarks/serve.py),
    with --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99 and serve_bench.sh's
    --metadata; the per-request lists shortened."""
    result = {
        "date": "20261206-044759", "endpoint_type": "openai", "backend": "openai", "label": None,
        "model_id": "/models/m", "tokenizer_id": "/models/m", "num_prompts": 4,
        "method": method, "speculative_config": "none", "request_rate": "inf",
        "burstiness": 1.0, "max_concurrency": concurrency, "duration": 2.0, "completed": 4,
        "failed": 0, "total_input_tokens": 72, "total_output_tokens": 48,
        "request_throughput": 2.0, "request_goodput": None, "output_throughput": throughput,
        "total_token_throughput": 60.0, "input_lens": [18] * 4, "output_lens": [12] * 4,
        "ttfts": [0.03] * 4, "itls": [[0.01]] * 4, "errors": [""] * 4,
        "max_output_tokens_per_s": 48.0, "max_concurrent_requests": concurrency, "rtfx": 0.0,
    }
    for metric, base in (("ttft", 30.0), ("tpot", 10.0), ("itl", 9.0)):
        result |= {f"mean_{metric}_ms": base, f"median_{metric}_ms": base,
                   f"std_{metric}_ms": 1.0, f"p50_{metric}_ms": base,
                   f"p99_{metric}_ms": 2 * base}
    return result | extra


SPEC_DECODE = {"spec_decode_acceptance_rate": 62.5, "spec_decode_acceptance_length": 2.25,
               "spec_decode_num_drafts": 8, "spec_decode_draft_tokens": 16,
               "spec_decode_accepted_tokens": 10,
               "spec_decode_per_position_acceptance_rates": [0.75, 0.5]}


def _write_results(folder, results):
    from benchmarks import serve_bench

    for r in results:
        (folder / serve_bench.result_name(r["method"], r["max_concurrency"])).write_text(
            json.dumps(r))


def test_the_serve_table_puts_methods_side_by_side(tmp_path):
    from benchmarks import serve_bench

    _write_results(tmp_path, [
        _bench_result("lookahead", 8, 150.0, **SPEC_DECODE),
        _bench_result("none", 8, 100.0),
        _bench_result("lookahead", 1, 30.0, **SPEC_DECODE, failed=1, completed=3),
        _bench_result("none", 1, 20.0),
    ])
    (tmp_path / "other.json").write_text('{"not": "a bench result"}')
    (tmp_path / "broken.json").write_text("{")
    text = serve_bench.report(tmp_path, ["none", "lookahead"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | c | requests | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms")
    assert rows[0].endswith("| output tok/s | x none | req/s | acceptance | acceptance length |")
    assert rows[1:] == [
        "| none | 1 | 4 | 30.00 | 60.00 | 10.00 | 20.00 | 9.00 | 18.00 | 20.0 | 1.00 | 2.000 "
        "| - | - |",
        "| none | 8 | 4 | 30.00 | 60.00 | 10.00 | 20.00 | 9.00 | 18.00 | 100.0 | 1.00 | 2.000 "
        "| - | - |",
        "| lookahead | 1 | 3 | 30.00 | 60.00 | 10.00 | 20.00 | 9.00 | 18.00 | 30.0 | 1.50 | 2.000 "
        "| 62.5 % | 2.25 |",
        "| lookahead | 8 | 4 | 30.00 | 60.00 | 10.00 | 20.00 | 9.00 | 18.00 | 150.0 | 1.50 | 2.000 "
        "| 62.5 % | 2.25 |",
    ]
    assert "**lookahead at c=1: 1 of 4 requests failed**" in text
    assert "`/models/m`" in text


def test_the_serve_table_pairs_each_round_with_nones_of_the_same_round(tmp_path):
    from benchmarks import serve_bench

    results = []
    for round_number, (none_rate, la_rate, la_ttft) in enumerate(
            [(100.0, 150.0, 33.0), (50.0, 60.0, 27.0)], start=1):
        meta = {"round": str(round_number)}  # vLLM bench stores --metadata values as strings
        failed = {"failed": 1, "completed": 3} if round_number == 1 else {}
        results += [_bench_result("none", 8, none_rate, **meta),
                    _bench_result("lookahead", 8, la_rate, **meta, p50_ttft_ms=la_ttft,
                                  **failed)]
    for r in results:
        name = serve_bench.result_name(r["method"], 8, int(r["round"]))
        (tmp_path / name).write_text(json.dumps(r))
    assert serve_bench.result_name("suffix[K=24]", 8, 2) == "suffix_K_24_-c8-r2.json"
    text = serve_bench.report(tmp_path, ["none", "lookahead"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | c | round | requests | TTFT p50 ms |")
    # Each round's ratio is to none's of that round: 150/100 and 60/50, not to a pooled none.
    assert [(r.split(" | ")[2], r.split(" | ")[-4]) for r in rows[3:5]] == [("1", "1.50"),
                                                                           ("2", "1.20")]
    assert rows[-1] == "| lookahead | 8 | 1.10 / 0.90 | 1.50 / 1.20 |"
    assert "TTFT p50 / none's, by round" in rows[-2]
    # A failure names its round, the first one included.
    assert "**lookahead at c=8 (round 1): 1 of 4 requests failed**" in text
    # One round: no round column and no paired table.
    one = [r for r in results if r["round"] == "1"]
    assert serve_bench.paired_rounds(one) == []
    assert "round" not in serve_bench.table(one)[0]


def test_the_serve_table_reads_vllms_default_percentiles_and_has_no_baseline_to_need(tmp_path):
    from benchmarks import serve_bench

    # A run of vLLM bench's own with its default --metric-percentiles 99: p50 is the median.
    mine = _bench_result("x", 4, 10.0, label="my-run")
    del mine["method"], mine["speculative_config"]
    del mine["p50_ttft_ms"]
    mine["median_ttft_ms"] = 12.0
    assert serve_bench.method_of(mine) == "my-run"
    [row] = serve_bench.table([mine])[2:]
    assert row.startswith("| my-run | 4 | 4 | 12.00 | 60.00 |") and "| 10.0 | - |" in row
    with pytest.raises(SystemExit, match="no `vllm bench serve` result files"):
        serve_bench.report(tmp_path)


def test_serve_bench_plans_the_harness_methods_and_a_slice_per_concurrency(tmp_path):
    from benchmarks import serve_bench

    configs = serve_bench.speculative_configs("none,ngram,suffix,lookahead,suffix-default", 8)
    assert configs == {name: methods.builtin_methods(8)[name]
                       for name in ("none", "ngram", "suffix", "lookahead", "suffix[K=24]")}
    assert configs["ngram"] == {"method": "ngram", "num_speculative_tokens": 8,
                                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    with pytest.raises(SystemExit, match="unknown"):
        serve_bench.speculative_configs("none,medusa", 8)
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "p0", "output_tokens": 5}',
                                         *(f'{{"prompt": "p{i}"}}' for i in range(1, 7))])
    records, slices = serve_bench.plan_cells(path, [1, 4], "2", 128)
    assert slices == {1: [0, 1], 4: [2, 3, 4, 5]}
    assert records[0] == {"prompt": "p0", "output_tokens": 5} and records[1] == {"prompt": "p1"}
    with pytest.raises(SystemExit, match=r"7 prompts, the cells need 10"):
        serve_bench.plan_cells(path, [2, 8], "2", 128)
    with pytest.raises(SystemExit, match=r"OUTPUT_LEN -1 .* prompts \[2, 3\] lack"):
        serve_bench.plan_cells(path, [1], "3", -1)
    assert serve_bench.result_name("suffix[K=24]", 8) == "suffix_K_24_-c8.json"


def test_serve_bench_plan_writes_the_cells_files(tmp_path):
    from benchmarks import serve_bench

    path = write_jsonl(tmp_path / "p.jsonl", [f'{{"prompt": "the cat sat {i}"}}' for i in range(3)])
    out = tmp_path / "out"
    args = serve_bench.parse_args(["plan", "tiny", str(path), "--out", str(out),
                                   "--concurrency", "1,2", "--num-prompts", "1",
                                   "--methods", "none,lookahead", "--output-len", "8"])
    records = [line.split("\t") for line in serve_bench.plan(args)]
    by_kind = {}
    for kind, *fields in records:
        by_kind.setdefault(kind, []).append(fields)
    assert by_kind["cell"] == [["1", "1", str(out / "prompts-c1.jsonl")],
                               ["2", "2", str(out / "prompts-c2.jsonl")]]
    assert by_kind["method"] == [["none", ""], ["lookahead", json.dumps(
        {"method": "lookahead", "num_speculative_tokens": 8})]]
    assert by_kind["warmup"] == [["2", str(out / "warmup.jsonl")]]
    assert int(by_kind["max_model_len"][0][0]) > 8
    assert (out / "prompts-c2.jsonl").read_text().splitlines() == [
        '{"prompt": "the cat sat 1"}', '{"prompt": "the cat sat 2"}']


@pytest.mark.engine
def test_serve_bench_runs_vllms_client_against_each_method(tmp_path):
    """The whole script once: two servers on the tiny model, vLLM bench at c=1, one table."""
    from benchmarks.tiny_model import tiny_model

    phrases = ["the cat sat on the mat", "one two three four", "red blue green house",
               "open the list and print the value", "the river ran down the stone"]
    prompts = write_jsonl(tmp_path / "tiny.jsonl",
                     [f'{{"prompt": "{" ".join([p] * 4)}"}}' for p in phrases])
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "NUM_PROMPTS": "5", "OUTPUT_LEN": "16",
           "VENV_BIN": str(Path(sys.executable).parent), "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = Path(__file__).parents[1] / "benchmarks" / "serve_bench.sh"
    proc = subprocess.run(["bash", str(script), str(tiny_model()), str(prompts), "1",
                           "none,lookahead"], env=env, capture_output=True, text=True,
                          timeout=1200)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The header and the rows; the separator line starts "|-".
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert list(rows) == ["none", "lookahead"]
    for row in rows.values():
        assert row["c"] == "1" and row["requests"] == "5"
        for column in ("TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                       "output tok/s"):
            assert float(row[column]) >= 0
    assert rows["none"]["acceptance"] == "-"
    assert 0 <= float(rows["lookahead"]["acceptance"].removesuffix(" %")) <= 100
    assert float(rows["lookahead"]["acceptance length"]) >= 1
    assert (out / "results.md").read_text().count("| lookahead | 1 |") == 1
