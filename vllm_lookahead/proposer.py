"""The vLLM-facing proposer: what vLLM's `custom_class` route constructs and calls each step.

vLLM calls `propose` once per step, after it has committed the step's tokens, with arrays indexed
by batch row. Rows move between steps, so all state is keyed by request id (in `drafter`); the
row ↔ id mapping and each request's details come from `engine_requests`, the verified chain with
the target's predictions from the hooks in `runner_hooks` (both read only the vLLM internals that
`vllm_boundary` declares).
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from typing import Any

import numpy as np

from vllm_lookahead import engine_requests, metrics, runner_hooks, vllm_boundary
from vllm_lookahead.config import LookaheadConfig, params_from_env
from vllm_lookahead.drafter import LookaheadDrafter
from vllm_lookahead.log import get_logger
from vllm_lookahead.trajectory import StepTrajectory

logger = get_logger(__name__)

STATS_PATH_ENV = metrics.STATS_PATH_ENV


class LookaheadProposer:
    """vLLM `custom_class` proposer: `LookaheadProposer(vllm_config)`, then `propose` each step."""

    uses_lookahead_hooks = True
    """What the runner hooks look for (they do not import this class)."""

    def __init__(self, vllm_config: Any) -> None:
        runner_hooks.install()
        engine_requests.check_synchronous_scheduling(vllm_config)
        spec = vllm_config.speculative_config
        cfg = _config_for(spec)
        adaptive = cfg.adaptive
        if adaptive is None:
            adaptive = vllm_config.device_config.device_type == "cpu"
        self.drafter = LookaheadDrafter(
            cfg, spec.num_speculative_tokens, vllm_config.model_config.max_model_len, adaptive,
            prefill_chunk=vllm_config.scheduler_config.max_num_batched_tokens)
        # vLLM takes the drafts of one rank only (tensor-parallel rank 0 of the last pipeline
        # stage: take_draft_token_ids replies from the executor's output rank); the others
        # propose empty chains and capture no trajectory, instead of work thrown away.
        self.drafts_here = engine_requests.is_reporting_worker()
        if self.drafts_here:
            self.drafter.warm_up()  # compiles (or loads) the kernels now, not in the first step
        self._runner: weakref.ReferenceType[Any] | None = None
        self._trajectory: StepTrajectory | None = None
        self._last_propose: float | None = None
        # Statistics export (vllm_lookahead.metrics): only the engine's reporting worker writes.
        self.chain_lengths = metrics.ChainLengths(spec.num_speculative_tokens)
        self.stats_writer = stats_writer(vllm_config)
        self.stats_writer.serve_live(self.snapshot)
        if self.stats_writer:
            atexit.register(lambda: self.stats_writer.write(self.snapshot()))
        logger.info("Lookahead decoding: %s, num_speculative_tokens=%d, adaptive chain=%s", cfg,
                    spec.num_speculative_tokens, adaptive)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Lookahead has no draft model; vLLM's CPU runner calls this unconditionally."""

    def bind_runner(self, runner: Any) -> None:
        if self._runner is None or self._runner() is not runner:
            vllm_boundary.check_attributes("GPUModelRunner", runner)
            vllm_boundary.check_attributes("InputBatch", runner.input_batch)
            self._runner = weakref.ref(runner)

    def set_trajectory(self, trajectory: StepTrajectory | None) -> None:
        self._trajectory = trajectory

    def on_request_removed(self, req_id: str) -> None:
        self.drafter.remove(req_id)
        if not self.drafter.states:
            self.stats_writer.idle(self.snapshot)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None,
                **_: Any) -> list[list[int]]:
        start = time.perf_counter()
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            raise RuntimeError(
                "vllm-lookahead: propose() was called before the runner hook bound the proposer; "
                "the hooks in vllm_lookahead.runner_hooks did not run on this vLLM build")
        trajectory, self._trajectory = self._trajectory, None
        if not self.drafts_here:
            return [[] for _ in sampled_token_ids]
        # From one propose to the next is one engine step: what the cost model learns from.
        step_seconds = start - self._last_propose if self._last_propose is not None else None
        self._last_propose = start
        req_ids = engine_requests.batch_req_ids(runner, len(sampled_token_ids))
        # Positions without a token id (prompt_embeds, multimodal) read as -1, never as stale ids.
        token_ids = engine_requests.drafter_token_ids(runner, token_ids_cpu, num_tokens_no_spec,
                                                      req_ids)
        drafts = self.drafter.draft_batch(
            req_ids, sampled_token_ids, num_tokens_no_spec, token_ids, trajectory,
            engine_requests.RunnerRequests(runner), step_seconds)
        self.drafter.stats.propose_seconds += time.perf_counter() - start
        self.chain_lengths.observe(drafts)
        self.stats_writer.after_step(self.snapshot)
        return drafts

    def snapshot(self) -> dict[str, Any]:
        """The drafter's statistics and the chain-length counts: what `/metrics` exports."""
        d = self.drafter.snapshot()
        d[metrics.CHAIN_LENGTHS] = list(self.chain_lengths.counts)
        return d


def _config_for(spec: Any) -> LookaheadConfig:
    """The parameters attached by the plugin, else the environment fallback, else defaults (the
    zero-patch `custom_class` form), reconciled with vLLM's K."""
    params = getattr(spec, "lookahead_params", None)
    if params is None:
        params = params_from_env() or {}
    cfg = LookaheadConfig.from_dict(params)
    k = cfg.resolve_num_speculative_tokens(spec.num_speculative_tokens,
                                           window_given="window_size" in params)
    return cfg.with_window_for(k)


def stats_writer(vllm_config: Any) -> metrics.StatsWriter:
    """The writer of this worker's statistics: files only on the engine's reporting worker."""
    if not engine_requests.is_reporting_worker():
        return metrics.StatsWriter([], {})
    index = engine_requests.engine_index(vllm_config)
    stats_dir = getattr(vllm_config.speculative_config, metrics.STATS_DIR_ATTR, None)
    paths = [metrics.user_stats_path(os.environ.get(metrics.STATS_PATH_ENV, ""))]
    if stats_dir:
        paths.append(metrics.engine_file(stats_dir, index))
    labels = {"model_name": str(vllm_config.model_config.served_model_name),
              "engine": str(index)}
    return metrics.StatsWriter(paths, labels)
