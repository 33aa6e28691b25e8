"""The proposer's counters, from the worker that drafts to the front-end that serves `/metrics`.

The counters live in the worker (inside the EngineCore process on CPU with TP=1, in a worker
process otherwise); Prometheus is served by the API-server process, from prometheus_client's
default registry (vLLM sets up a multiprocess registry only for `--api-server-count` > 1). vLLM has
no supported channel for a proposer's numbers (its SchedulerStats are built by the scheduler,
from the scheduler's own state), so:

* **Worker** (`StatsWriter`): the engine's reporting worker (TP rank 0; one per engine) writes the
  proposer's snapshot as JSON to `<stats dir>/engine-<index>.json`: at most every
  `WRITE_INTERVAL_S` under traffic, at once when the engine goes from idle to busy and from busy to
  idle (so a reader after traffic sees exact totals), and at exit. Written whole and renamed, so a
  reader never sees half a file.
* **Front-end** (`LookaheadCollector`): a prometheus_client collector in the default registry
  reads the files at scrape time and turns each snapshot into metric families named in vLLM's
  style (`vllm:lookahead_*`, labels `model_name` and `engine`), so they appear on `/metrics` next
  to vLLM's own and in `LLM.get_metrics()`. Scrapes cost one small file read per engine; nothing
  runs per step in the front-end. Where the engine core runs in the front-end's own process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker), the collector takes the proposer's snapshot
  directly instead (`StatsWriter.serve_live`): that engine steps only when asked, so it would not
  write its idle totals by itself.
* **Offline** (`engine_stats(llm)`): the same snapshots as dicts, without an RPC (so without
  VLLM_ALLOW_INSECURE_SERIALIZATION).

The stats directory is made by the plugin in the front-end (one per engine configuration) and
travels to the workers on the speculative config, like the lookahead parameters. Files are local:
a worker on another node (Ray) writes where the front-end cannot read, and those metrics are then
absent. The exporter maps the snapshot keys it knows and exports any other scalar number as a
gauge `vllm:lookahead_<key>`, so counters added to the drafter show up before they are mapped.
"""

from __future__ import annotations

import atexit
import inspect
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_lookahead import counters
from vllm_lookahead.log import get_logger

logger = get_logger(__name__)

STATS_PATH_ENV = "VLLM_LOOKAHEAD_STATS_PATH"
"""If set, the reporting worker also writes its snapshot to this one file (same schedule)."""

STATS_DIR_ATTR = "lookahead_stats_dir"
"""Attribute of vLLM's SpeculativeConfig that carries the stats directory to the workers."""

WRITE_INTERVAL_S = 0.5
PREFIX = "vllm:lookahead_"
LABELS = ("model_name", "engine")
META = "meta"
CHAIN_LENGTHS = "chain_length_counts"

# snapshot key -> (metric name without prefix, help), from the counters' one declaration.
COUNTERS: dict[str, tuple[str, str]] = {
    c.name: (c.metric, c.help) for c in counters.COUNTERS if c.metric and not c.by_source}
# snapshot key (a {source: count} dict) -> (metric name, help); label `source`.
BY_SOURCE: dict[str, tuple[str, str]] = {
    c.name: (c.metric, c.help) for c in counters.COUNTERS if c.metric and c.by_source}
GAUGES: dict[str, tuple[str, str]] = {
    "live_requests": ("live_requests", "Requests with lookahead state in the worker."),
    "pool_continuations": ("pool_continuations", "n-gram continuations held in the pools."),
    "pool_keys": ("pool_keys", "Keys of the n-gram pools."),
    "pool_bytes": ("pool_bytes", "Bytes held by the drafter: text indexes, pools, shared corpus."),
    "memory_budget_bytes": ("memory_budget_bytes", "The drafter's memory budget (bytes)."),
    "shared_tokens": ("shared_tokens", "Tokens held in the cross-request corpus."),
    "token_cost_s": ("token_cost_seconds",
                     "The step-cost model's seconds per verified token (what the cut weighs)."),
    "greedy_calibration": ("greedy_calibration",
                           "Accepted over expected acceptances of recently verified drafts of "
                           "greedy requests: what a new request's chain is priced with."),
    "sampled_calibration": ("sampled_calibration",
                            "The same for sampled requests."),
    "num_speculative_tokens": ("num_speculative_tokens",
                               "The engine's chain budget K (draft tokens per request per step)."),
}
# Totals that the by-source counters above split (exported as source="all" only if the split is
# missing from a snapshot).
TOTALS = {c.total_of: c.name for c in counters.COUNTERS if c.total_of}
# Keys that are not metrics of their own (labels, config, the histogram's raw counts, ...).
_NOT_METRICS = {"config", "adaptive", "step_cost_fit", META, CHAIN_LENGTHS}
_KNOWN_NAMES = {name for name, *_ in (*COUNTERS.values(), *BY_SOURCE.values(), *GAUGES.values())}


class ChainLengths:
    """How many chains of each length (0..K) the proposer returned: the chain-length histogram."""

    def __init__(self, k: int) -> None:
        self.counts = [0] * (k + 1)

    def observe(self, drafts: Iterable[Sequence[int]]) -> None:
        counts = self.counts
        top = len(counts) - 1
        for draft in drafts:
            if draft:
                counts[min(len(draft), top)] += 1


class StatsWriter:
    """Writes one worker's snapshot to its files (see the module docstring for when)."""

    def __init__(self, paths: Sequence[str], labels: Mapping[str, str],
                 interval_s: float = WRITE_INTERVAL_S) -> None:
        self.paths = [p for p in paths if p]
        self.labels = dict(labels)
        self.interval_s = interval_s
        self._last_write = -math.inf
        self._busy = False
        self._failed = False

    def __bool__(self) -> bool:
        return bool(self.paths)

    def after_step(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """After a step with requests: at once if the engine was idle, else throttled."""
        if not self.paths:
            return
        if self._busy and time.monotonic() - self._last_write < self.interval_s:
            return
        self._busy = True
        self.write(snapshot())

    def idle(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """The last request is gone: the totals are final until the next one."""
        if self.paths:
            self._busy = False
            self.write(snapshot())

    def serve_live(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Let a reader in this process (an engine core in the front-end's process) take
        `snapshot` directly, exact at any time, instead of the file. Held weakly."""
        ref = weakref.WeakMethod(snapshot) if inspect.ismethod(snapshot) else lambda: snapshot
        for path in self.paths:
            if _is_engine_file(path):
                _LIVE[os.path.abspath(path)] = (ref, self.labels)

    def write(self, snapshot: dict[str, Any]) -> None:
        self._last_write = time.monotonic()
        idle = not self._busy
        snapshot[META] = _meta(self.labels, idle=idle, exact=idle)
        text = json.dumps(snapshot)
        for path in self.paths:
            try:
                _write_atomically(path, text)
            except OSError as e:
                # The front-end may have removed its directory at exit before this worker ends.
                if not self._failed:
                    logger.warning("vllm-lookahead: cannot write statistics to %s: %s", path, e)
                    self._failed = True


def _meta(labels: Mapping[str, str], *, idle: bool, exact: bool) -> dict[str, Any]:
    """`exact`: the totals are final (written when idle, or read live); `engine_stats` waits for
    it."""
    return {"labels": dict(labels), "idle": idle, "exact": exact, "written_at": time.time(),
            "pid": os.getpid()}


# file path -> (weak reference to a snapshot function, labels) of writers in this process
_LIVE: dict[str, tuple[Callable[[], Any], dict[str, str]]] = {}


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def user_stats_path(template: str) -> str:
    """`$VLLM_LOOKAHEAD_STATS_PATH` with `{host}` and `{pid}` replaced by this process's host name
    and process id, so that one setting gives every replica of a cluster its own file."""
    return template.replace("{host}", socket.gethostname()).replace("{pid}", str(os.getpid()))


def engine_file(stats_dir: str, engine_index: int) -> str:
    return os.path.join(stats_dir, f"engine-{engine_index}.json")


def _is_engine_file(path: str) -> bool:
    return re.fullmatch(r"engine-\d+\.json", os.path.basename(path)) is not None


# --- front-end ---------------------------------------------------------------------------------

_OWNED_DIRS: list[str] = []


def new_stats_dir() -> str:
    """A fresh directory for one engine's statistics, removed when this process exits (not when a
    forked child does: children inherit atexit handlers)."""
    path = tempfile.mkdtemp(prefix="vllm-lookahead-stats-")
    owner = os.getpid()
    _OWNED_DIRS.append(path)
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


def read_snapshots(stats_dir: str | None) -> list[dict[str, Any]]:
    """Every engine's latest snapshot in a stats directory, in engine order."""
    if not stats_dir or not os.path.isdir(stats_dir):
        return []
    found: dict[int, dict[str, Any]] = {}
    for path in Path(stats_dir).glob("engine-*.json"):
        if not _is_engine_file(str(path)):
            continue
        try:
            found[_engine_of(path)] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed or replaced between listing and reading: skip this scrape
    for path, (ref, labels) in list(_LIVE.items()):
        snapshot = ref()
        if snapshot is None:
            del _LIVE[path]
        elif os.path.dirname(path) == os.path.abspath(stats_dir):
            live = snapshot()
            live[META] = _meta(labels, idle=live.get("live_requests") == 0, exact=True)
            found[_engine_of(Path(path))] = live
    return [found[index] for index in sorted(found)]


def _engine_of(path: Path) -> int:
    return int(path.stem.rpartition("-")[2])


class LookaheadCollector:
    """Exports the snapshots of the most recently configured lookahead engine of this process
    (vLLM's own metrics likewise describe the latest engine built in a process)."""

    def __init__(self) -> None:
        self.stats_dir: str | None = None

    def describe(self) -> list[Any]:
        # Without describe(), registering would call collect() (files may not exist yet).
        return []

    def collect(self) -> Iterator[Any]:
        try:
            yield from metric_families(read_snapshots(self.stats_dir))
        except Exception:  # a scrape must never fail because of the plugin
            logger.exception("vllm-lookahead: exporting statistics failed")


_COLLECTOR: list[LookaheadCollector] = []


def export(stats_dir: str | None) -> None:
    """Serve the statistics in `stats_dir` from this process's Prometheus registry (None: none).
    Idempotent: one collector per process, pointed at the latest engine's directory."""
    if stats_dir is None and not _COLLECTOR:
        return  # nothing exported yet: no need to touch prometheus_client
    if not _COLLECTOR:
        from prometheus_client import REGISTRY

        collector = LookaheadCollector()
        REGISTRY.register(collector)  # type: ignore[arg-type]
        _COLLECTOR.append(collector)
    _COLLECTOR[0].stats_dir = stats_dir


def metric_families(snapshots: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Prometheus metric families for the engines' snapshots (one label set per engine)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    families: dict[str, Any] = {}

    def family(kind: type, name: str, doc: str, extra: Sequence[str] = ()) -> Any:
        if name not in families:
            families[name] = kind(PREFIX + name, doc, labels=[*LABELS, *extra])
        return families[name]

    for snapshot in snapshots:
        labels = _labels(snapshot)
        for key, value in snapshot.items():
            if key in COUNTERS and _is_number(value):
                name, doc = COUNTERS[key]
                family(CounterMetricFamily, name, doc).add_metric(labels, value)
            elif key in BY_SOURCE and isinstance(value, Mapping):
                name, doc = BY_SOURCE[key]
                counter = family(CounterMetricFamily, name, doc, ("source",))
                for source, count in value.items():
                    if _is_number(count):
                        counter.add_metric([*labels, str(source)], count)
            elif key in TOTALS and _is_number(value):
                if TOTALS[key] not in snapshot:
                    name, doc = BY_SOURCE[TOTALS[key]]
                    family(CounterMetricFamily, name, doc, ("source",)).add_metric(
                        [*labels, "all"], value)
            elif key in GAUGES and _is_number(value):
                name, doc = GAUGES[key]
                family(GaugeMetricFamily, name, doc).add_metric(labels, value)
            elif key not in _NOT_METRICS and _is_number(value):
                # A statistic the exporter does not know yet: visible, typed as a gauge.
                family(GaugeMetricFamily, _extra_name(key),
                       f"lookahead statistic {key!r} (not yet typed by the exporter)"
                       ).add_metric(labels, value)
        if isinstance(snapshot.get("config"), Mapping):
            _add_config_info(family(GaugeMetricFamily, "config_info",
                                    "The engine's lookahead parameters (value 1).",
                                    _CONFIG_LABELS), labels, snapshot)
        lengths = snapshot.get(CHAIN_LENGTHS)
        if isinstance(lengths, list) and lengths:
            family(HistogramMetricFamily, "chain_length",
                   "Draft tokens proposed per request per step (chains with at least one)."
                   ).add_metric(labels, *_histogram(lengths))
    return list(families.values())


_CONFIG_LABELS = ("ngram_size", "window_size", "guess_set_size", "max_key_len",
                  "num_speculative_tokens", "adaptive")


def _add_config_info(gauge: Any, labels: list[str], snapshot: Mapping[str, Any]) -> None:
    values = {**snapshot["config"], "adaptive": snapshot.get("adaptive"),
              "num_speculative_tokens": snapshot.get("num_speculative_tokens")}
    gauge.add_metric([*labels, *(_label_value(values.get(k)) for k in _CONFIG_LABELS)], 1)


def _histogram(counts: Sequence[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets at 1, 2, 4, ... and K for per-length counts 0..K, and their sum."""
    k = len(counts) - 1
    bounds = sorted({2 ** i for i in range(k.bit_length()) if 2 ** i < k} | {k})
    buckets = [(str(float(bound)), float(sum(counts[:bound + 1]))) for bound in bounds]
    buckets.append(("+Inf", float(sum(counts))))
    return buckets, float(sum(length * count for length, count in enumerate(counts)))


def _labels(snapshot: Mapping[str, Any]) -> list[str]:
    meta = snapshot.get(META)
    given = meta.get("labels", {}) if isinstance(meta, Mapping) else {}
    return [str(given.get(name, "")) for name in LABELS]


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _extra_name(key: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return f"extra_{name}" if name in _KNOWN_NAMES or name == "config_info" else name


# --- offline -----------------------------------------------------------------------------------


def engine_stats(llm: Any, wait_idle_s: float = 10.0) -> list[dict[str, Any]]:
    """The proposer's statistics of each engine of an `LLM` (or `LLMEngine`/`AsyncLLM`), in
    engine order: the same dicts as `worker_stats`, read without an RPC.

    While requests run, a snapshot may be up to WRITE_INTERVAL_S old; once the engine is idle the
    worker writes its exact totals. So this waits (up to `wait_idle_s`) for every engine to report
    idle: call it after `generate` returns and the totals match vLLM's own counters. An engine
    core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) only steps when asked, so it would not
    go idle by itself; it is asked directly instead (no serialization in between).
    """
    engine = getattr(llm, "llm_engine", llm)
    if type(getattr(engine, "engine_core", None)).__name__ == "InprocClient":
        # (Its workers may be other processes, which write files only at their next step.)
        from vllm_lookahead.engine_requests import worker_stats

        # One snapshot per engine: the first (driver) worker's.
        return [s for s in engine.collective_rpc(worker_stats) if s is not None][:1]
    stats_dir = stats_dir_of(llm)
    deadline = time.monotonic() + wait_idle_s
    while True:
        snapshots = read_snapshots(stats_dir)
        if all(s.get(META, {}).get("exact") for s in snapshots) or time.monotonic() > deadline:
            return snapshots
        time.sleep(0.02)


def stats_dir_of(llm: Any) -> str | None:
    engine = getattr(llm, "llm_engine", llm)
    spec = getattr(getattr(engine, "vllm_config", None), "speculative_config", None)
    return getattr(spec, STATS_DIR_ATTR, None)
