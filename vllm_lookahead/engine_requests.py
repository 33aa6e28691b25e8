"""What the drafter reads of vLLM's requests and workers (targets declared in `vllm_boundary`):
each row's request id, each request's prompt length, stop tokens, options and prefill progress,
which prompt positions hold a real token id, and which worker reports."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from vllm_lookahead.config import LookaheadConfigError, RequestOptions
from vllm_lookahead.log import get_logger
from vllm_lookahead.runner_hooks import is_lookahead, reports_removals
from vllm_lookahead.trajectory import RequestInfo, stops_masked_until
from vllm_lookahead.vllm_boundary import UnsupportedVLLMError, check_attributes, vllm_version

logger = get_logger(__name__)


def check_synchronous_scheduling(vllm_config: Any) -> None:
    """The proposer reads the tokens a step committed when vLLM calls `propose`; with async
    scheduling vLLM would call it before they exist. vLLM turns async scheduling off for custom
    proposers today; this fails clearly should a vLLM ever run one with it on."""
    if vllm_config.scheduler_config.async_scheduling:
        raise UnsupportedVLLMError(
            f"vllm-lookahead needs synchronous scheduling, but vLLM {vllm_version()} built the "
            "lookahead proposer with scheduler_config.async_scheduling=True; start the engine "
            "with async_scheduling=False (--no-async-scheduling)")


def batch_req_ids(runner: Any, num_rows: int) -> list[str]:
    return list(runner.input_batch.req_ids[:num_rows])


class RunnerRequests:
    """The runner's live requests, as the drafter needs them."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.reports_removals = reports_removals(runner)

    def owner(self, req_id: str) -> object | None:
        return self._runner.requests.get(req_id)

    def info(self, row: int, req_id: str) -> RequestInfo:
        owner = self._runner.requests[req_id]
        check_attributes("CachedRequestState", owner)
        params = owner.sampling_params
        stops = frozenset() if params is None else frozenset(map(int, params.all_stop_token_ids))
        num_prompt = int(self._runner.input_batch.num_prompt_tokens[row])
        return RequestInfo(owner=owner,
                           num_prompt_tokens=num_prompt,
                           stop_token_ids=stops,
                           options=request_options(req_id, params),
                           greedy=_is_greedy(params),
                           prompt_mask=prompt_mask(owner),
                           max_new_tokens=params.max_tokens if params is not None else None,
                           stops_masked_until=stops_masked_until(
                               num_prompt, params.min_tokens if params is not None else 0, stops),
                           seeded=_is_seeded(params))

    def prefilled(self, req_id: str) -> int:
        state = self._runner.requests.get(req_id)
        return 0 if state is None else int(state.num_computed_tokens)


# --- Prompt positions without a token id (prompt_embeds, multimodal placeholders) ---------------
# vLLM keeps every request's tokens in `input_batch.token_ids_cpu`, but a position filled from
# `prompt_embeds` has no token id: the runner never writes it, so it holds whatever an earlier
# request left in that row (another user's text). Multimodal placeholders hold a real id (e.g. an
# image token repeated), which the model never generates. Neither may be copied into drafts or pad
# the Jacobi window: the drafter gets a mask (`RequestInfo.prompt_mask`) and sees -1 there.

_MASK_ATTR = "_vllm_lookahead_prompt_mask"
_NO_MASK = np.ones(0, dtype=bool)  # cached "every prompt position holds a token id"


def prompt_mask(req_state: Any) -> np.ndarray | None:
    """True where a prompt position of vLLM's `CachedRequestState` holds a real token id; None if
    every position does. Cached on the state object, which lives exactly as long as the request."""
    cached = getattr(req_state, _MASK_ATTR, None)
    if cached is None:
        cached = _compute_prompt_mask(req_state)
        # A state object with __slots__ cannot hold the cache: recomputed next time then.
        with contextlib.suppress(AttributeError):
            setattr(req_state, _MASK_ATTR, _NO_MASK if cached is None else cached)
        return cached
    return None if cached is _NO_MASK else cached


def _compute_prompt_mask(req_state: Any) -> np.ndarray | None:
    """The fields read here are required (`vllm_boundary`: CachedRequestState): a renamed one
    fails the step rather than turning the mask off."""
    num_prompt = req_state.num_prompt_tokens
    mask: np.ndarray | None = None
    if req_state.prompt_token_ids is None:
        mask = np.zeros(num_prompt, dtype=bool)  # prompt_embeds only
    elif req_state.prompt_is_token_ids is not None:
        mask = np.array(req_state.prompt_is_token_ids, dtype=bool)  # embeds parts: placeholders
    for feature in req_state.mm_features or ():
        where = feature.mm_position
        if mask is None:
            mask = np.ones(num_prompt, dtype=bool)
        span = mask[where.offset:where.offset + where.length]
        if where.is_embed is None:
            span[:] = False
        else:  # only these positions take the encoder's embeddings; the rest are real tokens
            span[np.asarray(where.is_embed.cpu(), dtype=bool)[:len(span)]] = False
    return None if mask is None or mask.all() else mask


def drafter_token_ids(runner: Any, token_ids_cpu: np.ndarray, num_tokens: np.ndarray,
                      req_ids: list[str]) -> np.ndarray:
    """The batch's tokens as the drafter may read them: `token_ids_cpu` itself, or, when some
    request has prompt positions without a token id, a copy of the batch's rows (up to its longest
    sequence) with -1 there. vLLM's buffer is never written."""
    if not (runner.enable_prompt_embeds or runner.supports_mm_inputs):
        return token_ids_cpu
    masked = []
    for row, req_id in enumerate(req_ids):
        state = runner.requests.get(req_id)
        mask = prompt_mask(state) if state is not None else None
        if mask is not None:
            masked.append((row, mask))
    if not masked:
        return token_ids_cpu
    rows = len(req_ids)
    tokens = token_ids_cpu[:rows, :int(num_tokens[:rows].max())].copy()
    for row, mask in masked:
        tokens[row, :len(mask)][~mask] = -1
    return tokens


def _is_seeded(params: Any) -> bool:
    """A sampled request with its own `seed` (a greedy one's tokens never depend on a seed)."""
    return params is not None and params.seed is not None and not _is_greedy(params)


def _is_greedy(params: Any) -> bool:
    """vLLM's own test: `SamplingParams.sampling_type` (pooling requests have no sampling
    parameters)."""
    return params is None or params.sampling_type.name == "GREEDY"


def request_options(req_id: str, params: Any) -> RequestOptions:
    """A request's lookahead options. The front-end has refused bad ones already; should one get
    here anyway (a front-end without the plugin's check), the request runs with the defaults
    rather than failing the engine."""
    try:
        return RequestOptions.from_extra_args(params.extra_args if params is not None else None)
    except LookaheadConfigError as e:
        logger.warning("vllm-lookahead: request %s: %s; using the default options", req_id, e)
        return RequestOptions()


def worker_stats(worker: Any) -> dict[str, Any] | None:
    """The proposer's statistics in one worker: `llm.collective_rpc(worker_stats)` (needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1; `vllm_lookahead.engine_stats(llm)` does not)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if not is_lookahead(drafter):
        return None
    return drafter.snapshot()


def is_reporting_worker() -> bool:
    """One worker reports per engine: tensor-parallel rank 0 (of the last pipeline stage, the only
    one that drafts): the executor's output rank, whose drafts vLLM uses; the other ranks do not
    draft."""
    try:
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().rank_in_group == 0
    except AssertionError:  # no TP group: the proposer was built outside a worker (tests)
        return True


def engine_index(vllm_config: Any) -> int:
    """The engine's index as vLLM's metrics label it (its data-parallel rank)."""
    parallel = vllm_config.parallel_config
    # data_parallel_index where the version has it (0.32+), else data_parallel_rank (0.26).
    index = getattr(parallel, "data_parallel_index", None)
    return int(parallel.data_parallel_rank if index is None else index)
