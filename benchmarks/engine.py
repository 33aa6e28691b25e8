"""What the demo and the benchmark harness share: environment, models, one vLLM engine at a time,
closed-loop generation, and the counters read around each measurement.

vLLM is imported inside the functions: `configure_env` must run before the first import, because
vLLM reads its settings at import time and its engine processes inherit the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.models import MODELS, ensure_model
from vllm_lookahead.config import MAX_SPEC_LEN
from vllm_lookahead.metrics import GAUGES, STATS_PATH_ENV

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM

TINY_MODEL = "tiny"
WARMUP_TOPICS = ("the sea", "a mountain", "the desert", "a river", "a forest", "the sky",
                 "a city", "the moon")
_WARMUP_TOKENS = 16


def configure_env(device: str = "cpu", kv_cache_gib: int = 4) -> None:
    """Quiet logs and a KV cache size on CPU; call before vLLM is imported. Explicit settings in
    the environment win."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Engine processes are spawned, so they read this at start; the filter below covers this one.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


def accelerator_name(device: str) -> str | None:
    """The card the numbers come from, for the report. Asked of nvidia-smi: a CUDA context in
    this process would hold GPU memory and make vLLM start later engines differently (spawn)."""
    if device != "cuda":
        return None
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = list(dict.fromkeys(line.strip() for line in listing.splitlines() if line.strip()))
    return ", ".join(names) or None


def resolve_model(name: str) -> Path:
    """A benchmark model by name, the tests' tiny random model (`tiny`), or a local HF folder."""
    if name == TINY_MODEL:
        from benchmarks.tiny_model import tiny_model

        return tiny_model()
    if name in MODELS:
        return ensure_model(name)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"unknown model {name!r}: not one of {', '.join([*MODELS, TINY_MODEL])} "
                         "and not a Hugging Face folder")
    return path


def load_tokenizer(model: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def warmup_texts(count: int) -> list[str]:
    """`count` distinct requests from no benchmark set: warming up teaches no proposer or
    cross-request cache a benchmark answer, and submits no prompt twice."""
    n = len(WARMUP_TOPICS)
    return [f"Write {i // n + 2} sentences about {WARMUP_TOPICS[i % n]}." for i in range(count)]


def warmup_prompts(tokenizer: PreTrainedTokenizerBase, count: int) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
            for text in warmup_texts(count)]


def model_len_for(prompts: Iterable[Sequence[int]], tokenizer: PreTrainedTokenizerBase,
                  max_tokens: int, warmup_count: int = 1) -> int:
    """Room for the longest prompt, the warm-up ones included, its answer, and the drafts.

    vLLM stops calling the proposer once a batch's longest sequence plus K would pass
    max_model_len, and verifies K zero tokens instead, for every request in the batch; without
    the headroom the last steps of long prompts would measure that, not the method."""
    longest = max(len(p) for p in [*prompts, *warmup_prompts(tokenizer, warmup_count)])
    return longest + max_tokens + 2 * MAX_SPEC_LEN


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: Path
    dtype: str
    max_model_len: int
    max_num_seqs: int
    seed: int
    enforce_eager: bool
    async_scheduling: bool | None = None
    """None lets vLLM decide (it turns async scheduling off for most speculative methods)."""
    iteration_details: bool = False
    """vLLM's per-step details in its scheduler stats (`benchmarks.step_log` reads them)."""


@dataclasses.dataclass(frozen=True)
class Engine:
    llm: LLM
    lookahead: bool
    stats_path: Path | None
    """Where a lookahead worker writes its counters, which shows the pool while requests are live
    (each request's pool is freed when it finishes)."""
    metrics: tuple[Any, ...]
    """This engine's Prometheus collectors, which `read_counters` reads."""


@contextmanager
def engine(cfg: EngineConfig, speculative_config: Mapping[str, Any] | None) -> Iterator[Engine]:
    """One engine, shut down on exit so that the next one gets its memory."""
    from vllm import LLM

    lookahead = bool(speculative_config) and speculative_config.get("method") == "lookahead"
    with tempfile.TemporaryDirectory(prefix="vllm-lookahead-bench-") as tmp:
        stats_path = Path(tmp) / "stats.json" if lookahead else None
        if stats_path:
            # Read by the proposer when the engine builds it; the worker inherits it at spawn.
            os.environ[STATS_PATH_ENV] = str(stats_path)
        try:
            llm = LLM(model=str(cfg.model), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                      max_num_seqs=cfg.max_num_seqs, seed=cfg.seed,
                      enforce_eager=cfg.enforce_eager, async_scheduling=cfg.async_scheduling,
                      # No prompt is sent twice, but prompts share their chat template's
                      # head and `related` ones their instructions: without a prefix cache every
                      # prefill costs the same in every cell, whatever ran before it.
                      enable_prefix_caching=False,
                      disable_log_stats=False,
                      # Only when asked, so that a vLLM without this argument runs the rest.
                      **({"enable_logging_iteration_details": True}
                         if cfg.iteration_details else {}),
                      speculative_config=dict(speculative_config) if speculative_config else None)
        finally:
            os.environ.pop(STATS_PATH_ENV, None)
        try:
            yield Engine(llm, lookahead, stats_path, tuple(_vllm_collectors()))
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


@dataclasses.dataclass
class Finished:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    forwards: int = 0
    """Target forwards that gave this request tokens (its engine steps with output)."""
    latency_s: float = 0.0
    """From this request's submission to its last token."""


@dataclasses.dataclass(frozen=True)
class Batch:
    outputs: list[Finished]
    """In prompt order."""
    wall_s: float
    pool_samples: list[dict[str, Any]]
    """Lookahead counters read while requests were live (empty for other methods)."""
    steps: int = 0
    """Engine steps that returned output (each one target forward for the batch)."""
    full_s: float = 0.0
    """Time spent in engine steps that began with `concurrency` requests in flight."""
    full_tokens: int = 0
    """Tokens those full-batch steps generated."""

    @property
    def output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def forwards(self) -> int:
        return sum(o.forwards for o in self.outputs)


def greedy(max_tokens: int, seed: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # DELTA: an output per request per engine step, which is how `generate` counts forwards.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False, seed=seed,
                          output_kind=RequestOutputKind.DELTA)


_request_ids = itertools.count()


def generate(eng: Engine, prompts: Sequence[Sequence[int]], params: Any, concurrency: int,
             on_step: Callable[[int, int], None] | None = None) -> Batch:
    """Closed loop: keep `concurrency` requests in flight, submitting the next prompt the moment
    one finishes (as a server under that many concurrent clients sees them). `params` must ask
    for DELTA outputs. `on_step(requests finished, tokens generated)` runs after every engine
    step (for progress reports; it must be cheap)."""
    pending = deque(enumerate(prompts))
    in_flight: dict[str, tuple[int, float, Finished]] = {}
    done: dict[int, Finished] = {}
    watcher = _StatsWatcher(eng.stats_path)
    tokens = steps = full_tokens = 0
    full_s = 0.0

    def submit() -> None:
        # Not LLM.enqueue: it returns vLLM's internal request ids, while outputs carry the
        # caller's, so its requests could not be matched to their outputs.
        index, prompt = pending.popleft()
        req_id = f"bench-{next(_request_ids)}"
        eng.llm.llm_engine.add_request(req_id, {"prompt_token_ids": list(prompt)}, params)
        in_flight[req_id] = (index, time.perf_counter(), Finished())

    start = time.perf_counter()
    while pending and len(in_flight) < concurrency:
        submit()
    while in_flight:
        # A stream fills its batch and drains it at the end; a method that finishes requests in
        # fewer steps spends a larger share of its steps in those ramps. Steps that begin with a
        # full batch measure the method at this concurrency.
        full = len(in_flight) >= min(concurrency, len(prompts))
        step_start, step_tokens = time.perf_counter(), tokens
        outputs = eng.llm.llm_engine.step()
        steps += bool(outputs)
        for out in outputs:
            index, submitted, request = in_flight[out.request_id]
            new = out.outputs[0]
            if new.token_ids:
                # One engine step, one target forward: vLLM's accepted-token counter cannot tell
                # this, as it also counts drafts accepted past a stop and then trimmed.
                request.forwards += 1
                request.token_ids += new.token_ids
                request.text += new.text
                tokens += len(new.token_ids)
            if out.finished:
                request.latency_s = time.perf_counter() - submitted
                del in_flight[out.request_id]
                done[index] = request
                if pending:
                    submit()
        if full:
            full_s += time.perf_counter() - step_start
            full_tokens += tokens - step_tokens
        watcher.poll()
        if on_step is not None:
            on_step(len(done), tokens)
    wall = time.perf_counter() - start
    return Batch([done[i] for i in range(len(prompts))], wall, watcher.samples, steps, full_s,
                 full_tokens)


class _StatsWatcher:
    """Collects each new snapshot of the lookahead stats file; one stat() per engine step."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._mtime = self._current_mtime()
        self.samples: list[dict[str, Any]] = []

    def _current_mtime(self) -> int | None:
        if self._path is None:
            return None
        try:
            return self._path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def poll(self) -> None:
        mtime = self._current_mtime()
        if self._path is None or mtime is None or mtime == self._mtime:
            return
        self._mtime = mtime
        # The writer replaces the file atomically; it can only vanish, at engine shutdown.
        with contextlib.suppress(FileNotFoundError):
            self.samples.append(json.loads(self._path.read_text()))


def warm_up(eng: Engine, tokenizer: PreTrainedTokenizerBase, concurrency: int) -> None:
    """Run the single-request and the batched paths once, so no timing pays for first calls;
    `concurrency` distinct prompts, all in flight at once."""
    generate(eng, warmup_prompts(tokenizer, concurrency), greedy(_WARMUP_TOKENS, 0), concurrency)


@dataclasses.dataclass(frozen=True)
class Counters:
    """vLLM's speculative-decoding counters and, for lookahead, the proposer's own."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: tuple[int, ...] = ()
    proposer: dict[str, Any] | None = None

    def minus(self, before: Counters) -> Counters:
        return self._combine(before, -1)

    def plus(self, other: Counters) -> Counters:
        return self._combine(other, 1)

    def _combine(self, other: Counters, sign: int) -> Counters:
        # Methods without speculation have no per-position vector; treat it as zeros.
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        mine = self.accepted_per_pos or (0,) * width
        theirs = other.accepted_per_pos or (0,) * width
        return Counters(
            drafts=self.drafts + sign * other.drafts,
            draft_tokens=self.draft_tokens + sign * other.draft_tokens,
            accepted=self.accepted + sign * other.accepted,
            accepted_per_pos=tuple(a + sign * b for a, b in zip(mine, theirs, strict=True)),
            proposer=_combine(self.proposer, other.proposer, sign) if self.proposer else None,
        )


def _vllm_collectors() -> list[Any]:
    from prometheus_client import REGISTRY

    # The test vLLM itself uses to find its collectors (`unregister_vllm_metrics`).
    return [c for c in list(REGISTRY._collector_to_names)
            if getattr(c, "_name", "").startswith("vllm:")]


def _expose_metrics(eng: Engine) -> None:
    """Puts `eng`'s collectors in the process's Prometheus registry, from which vLLM reads every
    engine's metrics: building an engine drops the others' collectors from it, so with several
    engines loaded at once (`benchmarks.run --interleave`) it holds the last one's."""
    from prometheus_client import REGISTRY

    current = _vllm_collectors()
    if set(map(id, current)) == set(map(id, eng.metrics)):
        return
    for collector in current:
        REGISTRY.unregister(collector)
    for collector in eng.metrics:
        REGISTRY.register(collector)


def read_counters(eng: Engine) -> Counters:
    from vllm.v1.metrics.reader import Counter, Vector

    _expose_metrics(eng)
    spec = {m.name.removeprefix("vllm:spec_decode_"): m for m in eng.llm.get_metrics()
            if m.name.startswith("vllm:spec_decode_")}

    def count(name: str) -> int:
        metric = spec.get(name)
        return metric.value if isinstance(metric, Counter) else 0

    per_pos = spec.get("num_accepted_tokens_per_pos")
    proposer = proposer_stats(eng.llm) if eng.lookahead else None
    return Counters(
        drafts=count("num_drafts"),
        draft_tokens=count("num_draft_tokens"),
        accepted=count("num_accepted_tokens"),
        accepted_per_pos=tuple(per_pos.values) if isinstance(per_pos, Vector) else (),
        proposer=proposer,
    )


def proposer_stats(llm: LLM) -> dict[str, Any] | None:
    """The lookahead proposer's counters, read from the stats file its worker writes: no RPC, so
    the engine needs no VLLM_ALLOW_INSECURE_SERIALIZATION. Called between measurements, when the
    engine is idle and the file holds its exact totals."""
    from vllm_lookahead import engine_stats
    from vllm_lookahead.metrics import META

    snapshots = engine_stats(llm)
    if not snapshots:
        return None
    # The file's own bookkeeping (writer, time) is no counter and must not enter the deltas.
    return {key: value for key, value in snapshots[0].items() if key != META}


def _combine(mine: Mapping[str, Any], other: Mapping[str, Any] | None,
             sign: int) -> dict[str, Any]:
    """Counters added or subtracted key by key, nested counters recursed into; settings and gauges
    (the config, live requests, pool sizes) are left out because their sum means nothing."""
    other = other or {}
    out: dict[str, Any] = {}
    for key, value in mine.items():
        if key in _GAUGES:
            continue
        if isinstance(value, Mapping):
            out[key] = _combine(value, other.get(key), sign)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value + sign * other.get(key, 0)
    return out


_GAUGES = frozenset({"config", *GAUGES})


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Derived per-measurement figures; None where the method drafted nothing."""

    tokens_per_forward: float
    mean_acceptance_length: float | None
    acceptance_rate: float | None
    per_position: list[float]

    @classmethod
    def of(cls, output_tokens: int, forwards: int, delta: Counters) -> Speculation:
        return cls(
            tokens_per_forward=output_tokens / forwards if forwards > 0 else float("nan"),
            mean_acceptance_length=1 + delta.accepted / delta.drafts if delta.drafts else None,
            acceptance_rate=delta.accepted / delta.draft_tokens if delta.draft_tokens else None,
            per_position=[a / delta.drafts for a in delta.accepted_per_pos] if delta.drafts
            else [],
        )
