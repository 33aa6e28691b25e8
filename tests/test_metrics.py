"""The statistics exporter: snapshot → Prometheus families, the worker's write schedule, the
front-end's directory and collector (no engine; the server and LLM paths are in
test_observability.py)."""

import json
import pickle
import threading
import time
from types import SimpleNamespace

import pytest

from vllm_lookahead import metrics
from vllm_lookahead.counters import LookaheadStats

SNAPSHOT = {
    "steps": 10, "chains": 8, "draft_tokens": 30, "accepted_tokens": 12,
    "verified_chains": 7, "verified_tokens": 25, "trajectory_ngrams": 4, "resyncs": 0,
    "drafted_by_source": {"prompt": 10, "output": 0, "shared": 0, "trajectory": 0, "jacobi": 15,
                          "fill": 5},
    "accepted_by_source": {"prompt": 8, "output": 0, "shared": 0, "trajectory": 0, "jacobi": 4,
                           "fill": 0},
    "propose_seconds": 0.25, "live_requests": 2, "pool_continuations": 40, "pool_keys": 30,
    "config": {"ngram_size": 3, "window_size": 4, "guess_set_size": 8, "max_key_len": 2},
    "num_speculative_tokens": 6, "adaptive": True,
    "brand_new_counter": 3, "a_list": [1, 2],
    metrics.CHAIN_LENGTHS: [0, 1, 0, 2, 0, 0, 5],
    metrics.META: {"labels": {"model_name": "tiny", "engine": "0"}, "idle": True},
}


def samples(snapshots) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the families for these snapshots."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.metric_families(snapshots) for s in family.samples}


def value(found, name, **labels):
    return found[(name, tuple(sorted({"model_name": "tiny", "engine": "0", **labels}.items())))]


def test_the_snapshot_above_is_shaped_like_the_drafters():
    """SNAPSHOT stands in for what workers write: its by-source counters must use the sources the
    drafter counts, or the exporter is tested on names no engine produces."""
    real = LookaheadStats().as_dict()
    for key in ("drafted_by_source", "accepted_by_source"):
        assert SNAPSHOT[key].keys() == real[key].keys()


def test_snapshot_becomes_vllm_style_metrics():
    found = samples([SNAPSHOT])
    assert value(found, "vllm:lookahead_steps_total") == 10
    assert value(found, "vllm:lookahead_verified_tokens_total") == 25
    assert value(found, "vllm:lookahead_proposer_seconds_total") == 0.25
    assert value(found, "vllm:lookahead_accepted_tokens_total", source="jacobi") == 4
    assert value(found, "vllm:lookahead_accepted_tokens_total", source="prompt") == 8
    assert value(found, "vllm:lookahead_draft_tokens_total", source="fill") == 5
    assert value(found, "vllm:lookahead_draft_tokens_total", source="prompt") == 10
    # The by-source counters are the split of the totals (which are not exported twice).
    accepted = [v for (n, _), v in found.items() if n == "vllm:lookahead_accepted_tokens_total"]
    assert sum(accepted) == SNAPSHOT["accepted_tokens"]
    assert value(found, "vllm:lookahead_live_requests") == 2
    assert value(found, "vllm:lookahead_pool_continuations") == 40
    assert value(found, "vllm:lookahead_config_info", ngram_size="3", window_size="4",
                 guess_set_size="8", max_key_len="2", num_speculative_tokens="6",
                 adaptive="true") == 1
    # chain lengths 1 (once), 3 (twice), 6 (five times)
    assert value(found, "vllm:lookahead_chain_length_bucket", le="2.0") == 1
    assert value(found, "vllm:lookahead_chain_length_bucket", le="4.0") == 3
    assert value(found, "vllm:lookahead_chain_length_bucket", le="6.0") == 8
    assert value(found, "vllm:lookahead_chain_length_count") == 8
    assert value(found, "vllm:lookahead_chain_length_sum") == 1 + 6 + 30
    assert all(name.startswith("vllm:lookahead_") for name, _ in found)


def test_new_snapshot_keys_are_exported_as_gauges_and_missing_ones_skipped():
    found = samples([{"steps": 1, "pool_bytes": 4096, "brand_new_counter": 3,
                      "accepted_tokens": 5, "nested": {"x": 1}, "text": "x"}])
    names = {name for name, _ in found}
    assert ("vllm:lookahead_pool_bytes", (("engine", ""), ("model_name", ""))) in found
    assert "vllm:lookahead_brand_new_counter" in names
    # a total without its split is still exported, as source="all"
    assert found[("vllm:lookahead_accepted_tokens_total",
                  (("engine", ""), ("model_name", ""), ("source", "all")))] == 5
    assert not any("nested" in n or "text" in n or "chain_length" in n for n in names)


def test_engines_are_labelled_apart():
    other = {**SNAPSHOT, metrics.META: {"labels": {"model_name": "tiny", "engine": "1"}}}
    found = samples([SNAPSHOT, other])
    assert value(found, "vllm:lookahead_steps_total") == 10
    assert value(found, "vllm:lookahead_steps_total", engine="1") == 10


def test_writer_writes_on_idle_to_busy_then_throttled_then_on_idle(tmp_path):
    path = tmp_path / "engine-0.json"
    writer = metrics.StatsWriter([str(path)], {"model_name": "m", "engine": "0"},
                                 interval_s=3600)
    state = {"steps": 0}

    def snap():
        return dict(state)

    def written():
        return json.loads(path.read_text())

    state["steps"] = 1
    writer.after_step(snap)  # first step after idle: at once
    assert written()["steps"] == 1
    assert written()[metrics.META]["idle"] is False
    state["steps"] = 2
    writer.after_step(snap)  # within the interval: not yet
    assert written()["steps"] == 1
    writer.idle(snap)  # the last request left: exact totals
    assert written()["steps"] == 2
    assert written()[metrics.META] == {**written()[metrics.META], "idle": True, "exact": True,
                                       "labels": {"model_name": "m", "engine": "0"}}
    state["steps"] = 3
    writer.after_step(snap)  # busy again: at once
    assert written()["steps"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_without_paths_does_nothing_and_survives_a_removed_directory(tmp_path,
                                                                            monkeypatch):
    assert not metrics.StatsWriter([""], {})
    metrics.StatsWriter([], {}).after_step(lambda: pytest.fail("no snapshot needed"))
    warnings: list[str] = []
    monkeypatch.setattr(metrics.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    gone = metrics.StatsWriter([str(tmp_path / "gone" / "engine-0.json")], {})
    gone.idle(dict)  # raises nothing
    gone.idle(dict)
    # A worker outliving the front-end's directory writes every step: one line, not one per step.
    assert len(warnings) == 1
    assert "cannot write statistics" in warnings[0]


def test_chain_lengths_count_non_empty_chains_up_to_k():
    lengths = metrics.ChainLengths(4)
    lengths.observe([[1, 2], [], [1, 2, 3, 4], [1, 2]])
    assert lengths.counts == [0, 0, 2, 0, 1]


def fake_llm(stats_dir):
    spec = SimpleNamespace(**{metrics.STATS_DIR_ATTR: stats_dir})
    return SimpleNamespace(llm_engine=SimpleNamespace(
        vllm_config=SimpleNamespace(speculative_config=spec)))


def test_engine_stats_waits_for_the_idle_totals(tmp_path):
    writer = metrics.StatsWriter([metrics.engine_file(str(tmp_path), 0)], {"engine": "0"})
    writer.after_step(lambda: {"steps": 1})
    later = threading.Timer(0.3, writer.idle, args=(lambda: {"steps": 2},))
    later.start()
    start = time.monotonic()
    (stats,) = metrics.engine_stats(fake_llm(str(tmp_path)))
    later.join()
    assert stats["steps"] == 2
    assert time.monotonic() - start >= 0.25
    assert metrics.engine_stats(fake_llm(None)) == []


def test_collector_serves_the_files_to_vllms_metrics_reader(tmp_path):
    """`LLM.get_metrics()` reads prometheus_client's default registry with vLLM's reader, which
    accepts counters, gauges and histograms only."""
    from vllm.v1.metrics.reader import Counter, Histogram, get_metrics_snapshot

    (tmp_path / "engine-0.json").write_text(json.dumps(SNAPSHOT))
    metrics.export(str(tmp_path))
    try:
        found = {(m.name, m.labels.get("source")): m for m in get_metrics_snapshot()
                 if m.name.startswith("vllm:lookahead_")}
    finally:
        metrics.export(None)
    assert isinstance(found[("vllm:lookahead_accepted_tokens", "jacobi")], Counter)
    assert found[("vllm:lookahead_accepted_tokens", "jacobi")].value == 4
    assert found[("vllm:lookahead_steps", None)].labels == {"model_name": "tiny", "engine": "0"}
    assert isinstance(found[("vllm:lookahead_chain_length", None)], Histogram)
    assert not [m for m in get_metrics_snapshot() if m.name.startswith("vllm:lookahead_")]


def test_a_broken_file_is_skipped(tmp_path):
    (tmp_path / "engine-0.json").write_text("{half a fi")
    (tmp_path / "engine-1.json").write_text(json.dumps(SNAPSHOT))
    assert metrics.read_snapshots(str(tmp_path)) == [SNAPSHOT]


def test_front_end_gives_each_engine_config_a_stats_directory(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_model, max_model_len=512,
                      speculative_config={"method": "lookahead", "num_speculative_tokens": 5})
    first = args.create_engine_config().speculative_config
    second = args.create_engine_config().speculative_config
    stats_dir = getattr(first, metrics.STATS_DIR_ATTR)
    assert stats_dir and getattr(second, metrics.STATS_DIR_ATTR) == stats_dir
    assert getattr(pickle.loads(pickle.dumps(second)), metrics.STATS_DIR_ATTR) == stats_dir
    assert metrics._COLLECTOR[0].stats_dir == stats_dir
    other = EngineArgs(model=tiny_model, max_model_len=512,
                       speculative_config={"method": "lookahead"}).create_engine_config()
    assert getattr(other.speculative_config, metrics.STATS_DIR_ATTR) != stats_dir
    # A later engine without lookahead: nothing stale is exported.
    EngineArgs(model=tiny_model, max_model_len=512).create_engine_config()
    assert metrics._COLLECTOR[0].stats_dir is None


def test_only_the_engines_reporting_worker_writes(monkeypatch, tmp_path):
    from vllm_lookahead import engine_requests, proposer

    config = SimpleNamespace(
        speculative_config=SimpleNamespace(**{metrics.STATS_DIR_ATTR: str(tmp_path)}),
        parallel_config=SimpleNamespace(data_parallel_index=2, data_parallel_rank=2),
        model_config=SimpleNamespace(served_model_name="tiny"))
    monkeypatch.setenv(metrics.STATS_PATH_ENV, str(tmp_path / "all.json"))
    writer = proposer.stats_writer(config)
    assert writer.paths == [str(tmp_path / "all.json"), str(tmp_path / "engine-2.json")]
    assert writer.labels == {"model_name": "tiny", "engine": "2"}
    monkeypatch.setattr(engine_requests, "is_reporting_worker", lambda: False)
    assert not proposer.stats_writer(config)


def test_the_stats_path_names_each_process_its_own_file(monkeypatch, tmp_path):
    import os
    import socket

    template = str(tmp_path / "{host}" / "stats-{pid}.json")
    assert metrics.user_stats_path(template) == \
        str(tmp_path / socket.gethostname() / f"stats-{os.getpid()}.json")
    assert metrics.user_stats_path(str(tmp_path / "plain.json")) == str(tmp_path / "plain.json")


class _Proposer:
    def __init__(self):
        self.steps = 0

    def snapshot(self):
        return {"steps": self.steps, "live_requests": 1}


def test_a_reader_in_the_proposers_process_takes_the_live_snapshot(tmp_path):
    """An engine core in the front-end's process steps only when asked, so it would not write its
    idle totals by itself: there the collector reads the proposer directly."""
    writer = metrics.StatsWriter([str(tmp_path / "x.json"), metrics.engine_file(str(tmp_path), 3)],
                                 {"engine": "3"}, interval_s=3600)
    proposer = _Proposer()
    writer.serve_live(proposer.snapshot)
    writer.after_step(proposer.snapshot)
    proposer.steps = 5  # not written yet (throttled)
    (live,) = metrics.read_snapshots(str(tmp_path))
    assert live["steps"] == 5
    assert live[metrics.META]["exact"] is True and live[metrics.META]["idle"] is False
    assert live[metrics.META]["labels"] == {"engine": "3"}
    del proposer  # held weakly: the file takes over
    (written,) = metrics.read_snapshots(str(tmp_path))
    assert written["steps"] == 0 and written[metrics.META]["exact"] is False
