"""The worker-side hooks on vLLM's model runner (targets declared in `vllm_boundary`).

Installed when a lookahead proposer is built, after every worker target was checked, so they exist
in exactly the processes that run a lookahead drafter (even where `VLLM_PLUGINS` filtered the
entry point). Every hook passes its arguments through untouched for a runner whose drafter is not
lookahead's.

* `GPUModelRunner._sample` (inherited by `CPUModelRunner`) binds the proposer to its runner and
  records the chain verified this step with the target's greedy prediction at every position.
  CUDA: an on-device argmax over the draft rows and a non-blocking copy to pinned memory; the
  runner's own `.cpu()` in `_bookkeeping_sync` completes it before `propose` reads it. CPU: the
  rejection sampler's own argmax, read through a tap on its greedy kernel dispatcher, so nothing is
  recomputed; only a batch whose requests all sample (no greedy row, so no argmax in vLLM) pays an
  argmax over the draft rows, as does every batch on a vLLM without that dispatcher.
* `GPUModelRunner._on_request_state_removed` frees a finished or aborted request's state.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from vllm_lookahead import cpu_workarounds, vllm_boundary
from vllm_lookahead.log import get_logger
from vllm_lookahead.trajectory import StepTrajectory
from vllm_lookahead.vllm_boundary import MARK, Side, UnsupportedVLLMError

logger = get_logger(__name__)

SAMPLE = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample"
REMOVED = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._on_request_state_removed"
GREEDY_SAMPLE = "vllm.v1.sample.rejection_sampler._rejection_greedy_sample"


def is_lookahead(drafter: Any) -> bool:
    """The runner's drafter is a lookahead proposer (marked by a class attribute, so that this
    module need not import the proposer, which imports it)."""
    return getattr(type(drafter), "uses_lookahead_hooks", False) is True


def install() -> None:
    """Check every worker target, then install the hooks (idempotent). Raises
    UnsupportedVLLMError, listing every mismatch, before anything is patched."""
    degraded = {t.target for t in vllm_boundary.require(Side.WORKER)}
    cpu_workarounds.make_llvmlite_scan_safe()
    vllm_boundary.install(SAMPLE, _wrapped(_sample_hook, SAMPLE))
    if REMOVED in degraded:
        logger.info("vllm-lookahead: no GPUModelRunner._on_request_state_removed in this vLLM; "
                    "finished requests are swept periodically instead")
    else:
        vllm_boundary.install(REMOVED, _wrapped(_removed_hook, REMOVED))
    if GREEDY_SAMPLE not in degraded:
        vllm_boundary.install(GREEDY_SAMPLE, _GreedyArgmaxTap(vllm_boundary.resolve(GREEDY_SAMPLE)))
    cpu_workarounds.apply_at_proposer_start()


def reports_removals(runner: Any) -> bool:
    """Whether this runner class calls the removal hook for every request it drops."""
    hook = getattr(type(runner), "_on_request_state_removed", None)
    return getattr(hook, MARK, False)


def _greedy_tap_installed() -> bool:
    from vllm.v1.sample import rejection_sampler

    return isinstance(getattr(rejection_sampler, "_rejection_greedy_sample", None),
                      _GreedyArgmaxTap)


def _wrapped(make: Callable[[Callable[..., Any]], Callable[..., Any]],
             target: str) -> Callable[..., Any]:
    original = vllm_boundary.resolve(target)
    return functools.wraps(original)(make(original))


def _sample_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafter = getattr(self, "drafter", None)
        if not is_lookahead(drafter):
            return original(self, *args, **kwargs)
        logits = _argument(args, kwargs, 0, "logits")
        spec_decode_metadata = _argument(args, kwargs, 1, "spec_decode_metadata")
        drafter.bind_runner(self)
        lift_batch_length_gate(self)
        if spec_decode_metadata is None or logits is None:
            drafter.set_trajectory(None)
            return original(self, *args, **kwargs)
        if not any(spec_decode_metadata.num_draft_tokens):
            drafter.set_trajectory(None)
            if cpu_workarounds.EMPTY_DRAFT_TOP_K.applies():
                return original(self, logits, None)
            return original(self, *args, **kwargs)
        if not getattr(drafter, "drafts_here", True):
            # Only the output rank's drafts are used: no trajectory to capture on the others.
            drafter.set_trajectory(None)
            return original(self, *args, **kwargs)
        capture = _Capture(self, logits, spec_decode_metadata)
        _TAP_SLOT[0] = capture
        try:
            output = original(self, *args, **kwargs)
        finally:
            _TAP_SLOT[0] = None
        drafter.set_trajectory(capture.finish())
        return output

    return _sample


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    """An argument of a call whose leading parameters `vllm_boundary` checked (after self)."""
    return args[position] if len(args) > position else kwargs[name]


def lift_batch_length_gate(runner: Any) -> None:
    """Let every request draft up to max_model_len, whatever the rest of the batch does.

    vLLM calls the proposer only if the batch's longest sequence plus K fits in
    `effective_drafter_max_model_len` (`_input_fits_in_drafter`, a guard for draft models with a
    shorter context); otherwise, for the whole batch, it skips the proposer and schedules K zero
    tokens per request as drafts, which are verified and rejected. Lookahead's chains never pass
    max_model_len on their own (`chain.compose` caps each request's chain), and the scheduler
    caps scheduled tokens at max_model_len too, so the guard is moved out of reach."""
    limit = int(runner.max_model_len) + int(runner.num_spec_tokens)
    if runner.effective_drafter_max_model_len < limit:
        runner.effective_drafter_max_model_len = limit


def _removed_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def _on_request_state_removed(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if is_lookahead(drafter):
            drafter.on_request_removed(_argument(args, kwargs, 0, "req_id"))
        return result

    return _on_request_state_removed


class _Capture:
    """One step's verified chains and target predictions, gathered around `_sample`."""

    def __init__(self, runner: Any, logits: Any, meta: Any) -> None:
        batch = runner.input_batch
        num_reqs = len(meta.num_draft_tokens)
        self.req_ids = list(batch.req_ids[:num_reqs])
        # Before bookkeeping, num_tokens_no_spec still counts the tokens committed before the step.
        # int64, as the drafter's kernel takes them: the copy converts for free.
        self.bases = batch.num_tokens_no_spec[:num_reqs].astype(np.int64)
        self.cu = np.concatenate([[0], np.cumsum(meta.num_draft_tokens)]).astype(np.int64)
        self.logits = logits
        self.meta = meta
        self.tapped: np.ndarray | None = None
        self.on_device = logits.device.type != "cpu"
        needs_own_argmax = (self.on_device or batch.sampling_metadata.all_random
                            or not _greedy_tap_installed())
        self.resolve = self._device_argmax() if needs_own_argmax else None

    def on_greedy_argmax(self, target_argmax: Any) -> None:
        if self.resolve is None:
            self.tapped = target_argmax.numpy().copy()

    def finish(self) -> StepTrajectory | None:
        if int(self.cu[-1]) == 0:
            return None
        argmax = self.resolve
        if argmax is None:
            if self.tapped is None:
                logger.warning("vllm-lookahead: the rejection sampler's argmax was not seen this "
                               "step; computing it (slower)")
                argmax = self._device_argmax()
            else:
                tapped = self.tapped
                argmax = lambda: tapped  # noqa: E731
        drafts = _host_copy(self.meta.draft_token_ids)
        return StepTrajectory(self.req_ids, self.bases, self.cu,
                              lambda: (drafts(), argmax()))

    def _device_argmax(self) -> Callable[[], np.ndarray]:
        rows = self.logits[self.meta.target_logits_indices]
        return _host_copy(rows.argmax(dim=-1))


def _host_copy(tensor: Any) -> Callable[[], np.ndarray]:
    """Start copying a tensor to the host; the returned function yields it as numpy (int64 from
    a CPU tensor, where the copy converts for free)."""
    if tensor.device.type == "cpu":
        array = tensor.numpy().astype(np.int64)
        return lambda: array
    import torch

    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> np.ndarray:
        done.synchronize()
        return host.numpy()

    return wait


_TAP_SLOT: list[_Capture | None] = [None]


class _GreedyArgmaxTap:
    """Stands in for vLLM's `_rejection_greedy_sample` dispatcher and forwards everything to it,
    handing the `target_argmax` it receives to the capture in progress."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.__wrapped__ = inner
        params = list(inspect.signature(inner).parameters)
        if "target_argmax" not in params:
            raise UnsupportedVLLMError(f"{GREEDY_SAMPLE} has no target_argmax parameter")
        self._argmax_pos = params.index("target_argmax")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        capture = _TAP_SLOT[0]
        if capture is not None:
            argmax = kwargs["target_argmax"] if "target_argmax" in kwargs \
                else args[self._argmax_pos]
            capture.on_greedy_argmax(argmax)
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
