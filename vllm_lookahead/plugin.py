"""The `vllm.general_plugins` entry point: makes `method: "lookahead"` a speculative method.

vLLM's `SpeculativeConfig.method` is a closed Literal, and vLLM already routes `custom_class`
proposers the way lookahead needs (V1 runner, synchronous scheduling, no draft model). So the plugin
rewrites `{"method": "lookahead", ...}` into `{"method": "custom_class", "model":
"vllm_lookahead.proposer.LookaheadProposer", ...}` in `EngineArgs.create_speculative_config`, the
one funnel for `LLM(speculative_config=...)`, `--speculative-config` and `--spec-method`, and hangs
the validated lookahead parameters on the resulting config, which travels pickled to every engine
and worker process (Ray included). Worker-side hooks live in `runner_hooks`; every vLLM internal
the plugin touches is declared in `vllm_boundary` and checked before anything is patched.

The same funnel runs in the front-end process (the API server, or the process that builds `LLM`),
so it also sets up the front-end's part of observability and per-request control: a statistics
directory on the config plus the collector that serves it on `/metrics` (`metrics`), and the check
of each request's lookahead options before the request reaches the engine
(`InputProcessor._validate_params`, vLLM's own per-request validation).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_lookahead import metrics, vllm_boundary
from vllm_lookahead.config import (
    METHOD,
    PARAMS_ENV,
    PROPOSER_CLASS,
    LookaheadConfigError,
    RequestOptions,
    translate_speculative_config,
)
from vllm_lookahead.log import get_logger
from vllm_lookahead.vllm_boundary import Side

logger = get_logger(__name__)

PARAMS_ATTR = "lookahead_params"
_STATS_DIR_OF_ARGS = "_lookahead_stats_dir"


class LookaheadRequestError(VLLMValidationError, LookaheadConfigError):
    """A request's lookahead options are invalid. The OpenAI server answers it with HTTP 400
    (a VLLMValidationError); `LLM.generate` raises it. The message names the option, the value and
    the valid range."""

    def __init__(self, message: str) -> None:
        # `param` of the HTTP error: the request field that carries the options.
        super().__init__(message, parameter="vllm_xargs")

    def __str__(self) -> str:
        # VLLMValidationError appends "(parameter=...)"; the message already names it.
        return str(self.args[0])


CREATE_SPEC = "vllm.engine.arg_utils.EngineArgs.create_speculative_config"
ADD_CLI_ARGS = "vllm.engine.arg_utils.EngineArgs.add_cli_args"
VALIDATE_PARAMS = "vllm.v1.engine.input_processor.InputProcessor._validate_params"


def register() -> None:
    """Entry point; vLLM calls it in every process, possibly more than once (in a worker, just
    before vLLM scans the loaded modules for its kernel overrides). Checks the vLLM version and
    every front-end target first; on a mismatch it logs one warning and installs only `refusal`
    (where the funnel itself is intact), so engines without lookahead run untouched."""
    from vllm_lookahead import cpu_workarounds

    cpu_workarounds.make_llvmlite_scan_safe()
    found = vllm_boundary.problems(Side.FRONT_END)
    refused = vllm_boundary.refusals(found)
    if refused:
        message = vllm_boundary.refusal_message(refused)
        if not _WARNED:
            logger.warning("%s; engines without lookahead are not affected", message)
            _WARNED.append(True)
        if vllm_boundary.problem(vllm_boundary.touchpoint(CREATE_SPEC)) is None:
            _install_refusal(CREATE_SPEC, message)
        return
    vllm_boundary.install(CREATE_SPEC, _translating(vllm_boundary.resolve(CREATE_SPEC)))
    vllm_boundary.install(ADD_CLI_ARGS,
                          _with_lookahead_choice(vllm_boundary.resolve(ADD_CLI_ARGS)))


_WARNED: list[bool] = []


def _install_refusal(target: str, reason: str) -> None:
    try:
        original = vllm_boundary.resolve(target)
    except (LookupError, AttributeError, ImportError):
        return  # nothing to wrap: vLLM itself refuses the unknown method
    vllm_boundary.install(target, _refusing(original, reason))


def _refusing(original: Callable[..., Any], reason: str) -> Callable[..., Any]:
    """Only `"method": "lookahead"` is answered, with the reason; everything else goes through
    untouched."""

    @functools.wraps(original)
    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _requested_method(self) == METHOD:
            raise vllm_boundary.UnsupportedVLLMError(reason)
        return original(self, *args, **kwargs)

    return create_speculative_config


def _requested_method(engine_args: Any) -> Any:
    return (engine_args.speculative_config or {}).get("method") or engine_args.spec_method


def _translating(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _requested_method(self) != METHOD:
            spec = original(self, *args, **kwargs)
            if _is_lookahead(spec):  # the zero-patch `custom_class` form
                _set_up_front_end(self, spec)
            else:
                metrics.export(None)  # a new engine without lookahead: stop exporting the last
            return spec
        # The worker's targets too, before any engine process starts (imports the runner).
        vllm_boundary.require(Side.WORKER)
        merged = dict(self.speculative_config or {})
        for key, value in (("method", self.spec_method), ("model", self.spec_model),
                           ("num_speculative_tokens", self.spec_tokens)):
            if value is not None:
                merged.setdefault(key, value)
        spec_dict, cfg = _validated(merged)
        saved = self.speculative_config, self.spec_method, self.spec_model, self.spec_tokens
        self.speculative_config, self.spec_method, self.spec_model, self.spec_tokens = (
            spec_dict, None, None, None)
        try:
            spec = original(self, *args, **kwargs)
        finally:
            # create_engine_config may run twice on the same EngineArgs (the CLI path does).
            self.speculative_config, self.spec_method, self.spec_model, self.spec_tokens = saved
        params = cfg.to_dict()
        object.__setattr__(spec, PARAMS_ATTR, params)
        os.environ[PARAMS_ENV] = json.dumps(params)
        _set_up_front_end(self, spec)
        logger.info("vllm-lookahead: method 'lookahead' -> custom_class %s with %s",
                    spec_dict["model"], params)
        return spec

    return create_speculative_config


def _is_lookahead(spec: Any) -> bool:
    return getattr(spec, "method", None) == "custom_class" and \
        getattr(spec, "model", None) == PROPOSER_CLASS


def _set_up_front_end(engine_args: Any, spec: Any) -> None:
    """Statistics directory and exporter, and the per-request option check. One directory per
    EngineArgs: `create_engine_config` may run twice on the same arguments (the CLI path does)."""
    stats_dir = getattr(engine_args, _STATS_DIR_OF_ARGS, None) or metrics.new_stats_dir()
    setattr(engine_args, _STATS_DIR_OF_ARGS, stats_dir)
    object.__setattr__(spec, metrics.STATS_DIR_ATTR, stats_dir)
    metrics.export(stats_dir)
    install_request_check()


def install_request_check() -> None:
    """Check each request's lookahead options where vLLM checks its sampling parameters, in the
    front-end, so that a bad option fails that request alone (HTTP 400) before it reaches the
    engine. Idempotent; its target was checked by `register`."""
    vllm_boundary.install(VALIDATE_PARAMS,
                          _with_request_check(vllm_boundary.resolve(VALIDATE_PARAMS)))


def _with_request_check(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _validate_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        spec = getattr(self, "speculative_config", None)
        if _is_lookahead(spec):
            params = args[0] if args else kwargs["params"]
            # PoolingParams have no extra_args; pooling requests have nothing to check.
            check_request_options(getattr(params, "extra_args", None),
                                  spec.num_speculative_tokens)
        return result

    return _validate_params


def check_request_options(extra_args: Any, num_speculative_tokens: int) -> RequestOptions:
    """The request's lookahead options, checked against the engine's K."""
    try:
        options = RequestOptions.from_extra_args(extra_args)
        options.check_engine_budget(num_speculative_tokens)
    except LookaheadConfigError as e:
        raise LookaheadRequestError(str(e)) from None
    return options


def _validated(user: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from vllm.config import SpeculativeConfig

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise LookaheadConfigError(
            "VLLM_USE_V2_MODEL_RUNNER=1 forces vLLM's V2 model runner, which has no custom "
            "proposer support; lookahead runs on the V1 runner: unset VLLM_USE_V2_MODEL_RUNNER")
    fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    return translate_speculative_config(user, fields)


def _with_lookahead_choice(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_cli_args(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        for action in parser._actions:
            if "--spec-method" in action.option_strings and action.choices is not None \
                    and METHOD not in action.choices:
                action.choices = [*action.choices, METHOD]
        return parser

    return add_cli_args
