"""The `vllm.general_plugins` entry point: makes `method: "lookahead"` a speculative method.

vLLM's `SpeculativeConfig.method` is a closed Literal, and vLLM already routes `custom_class`
proposers the way lookahead needs (V1 runner, synchronous scheduling, no draft model). So the plugin
rewrites `{"method": "lookahead", ...}` into `{"method": "custom_class", "model":
"vllm_lookahead.proposer.LookaheadProposer", ...}` in `EngineArgs.create_speculative_config`, the
one funnel for `LLM(speculative_config=...)`, `--speculative-config` and `--spec-method`, and hangs
the validated lookahead parameters on the resulting config, which travels pickled to every engine
and worker process (Ray included). Worker-side hooks live in `vllm_compat`.

The same funnel runs in the front-end process (the API server, or the process that builds `LLM`),
so it also sets up the front-end's part of observability and per-request control: a statistics
directory on the config plus the collector that serves it on `/metrics` (`metrics`), and the check
of each request's lookahead options before the request reaches the engine
(`InputProcessor._validate_params`, vLLM's own per-request validation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_lookahead import metrics
from vllm_lookahead.config import (
    METHOD,
    PARAMS_ENV,
    PROPOSER_CLASS,
    LookaheadConfigError,
    RequestOptions,
    translate_speculative_config,
)
from vllm_lookahead.log import get_logger

logger = get_logger(__name__)

_MARK = "_vllm_lookahead_hook"
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


def register() -> None:
    """Entry point; vLLM calls it in every process, possibly more than once (in a worker, just
    before vLLM scans the loaded modules for its kernel overrides)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_lookahead import vllm_compat

    vllm_compat.make_llvmlite_scan_safe()

    if not getattr(EngineArgs.create_speculative_config, _MARK, False):
        EngineArgs.create_speculative_config = _translating(EngineArgs.create_speculative_config)
    add_cli_args = EngineArgs.__dict__["add_cli_args"].__func__
    if not getattr(add_cli_args, _MARK, False):
        EngineArgs.add_cli_args = staticmethod(_with_lookahead_choice(add_cli_args))


def _translating(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_speculative_config(self: Any, target_model_config: Any,
                                  target_parallel_config: Any) -> Any:
        user = self.speculative_config
        method = (user or {}).get("method") or self.spec_method
        if method != METHOD:
            spec = original(self, target_model_config, target_parallel_config)
            if _is_lookahead(spec):  # the zero-patch `custom_class` form
                _set_up_front_end(self, spec)
            else:
                metrics.export(None)  # a new engine without lookahead: stop exporting the last
            return spec
        merged = dict(user or {})
        for key, value in (("method", self.spec_method), ("model", self.spec_model),
                           ("num_speculative_tokens", self.spec_tokens)):
            if value is not None:
                merged.setdefault(key, value)
        spec_dict, cfg = _validated(merged)
        saved = self.speculative_config, self.spec_method, self.spec_model, self.spec_tokens
        self.speculative_config, self.spec_method, self.spec_model, self.spec_tokens = (
            spec_dict, None, None, None)
        try:
            spec = original(self, target_model_config, target_parallel_config)
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

    setattr(create_speculative_config, _MARK, True)
    create_speculative_config.__doc__ = original.__doc__
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
    engine. Idempotent; a private method, so its signature is checked first."""
    import inspect

    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_lookahead import vllm_compat

    vllm_compat.check_vllm_version()
    original = InputProcessor.__dict__.get("_validate_params")
    if getattr(original, _MARK, False):
        return
    expected = ("self", "params", "supported_tasks")
    if original is None or tuple(inspect.signature(original).parameters)[:3] != expected:
        raise vllm_compat.UnsupportedVLLMError(
            f"vllm-lookahead: InputProcessor._validate_params{expected} not found in vLLM "
            f"{vllm_compat.vllm_version()}; per-request lookahead options cannot be checked")

    InputProcessor._validate_params = _with_request_check(original)


def _with_request_check(original: Callable[..., Any]) -> Callable[..., Any]:
    def _validate_params(self: Any, params: Any, supported_tasks: Any) -> Any:
        result = original(self, params, supported_tasks)
        spec = getattr(self, "speculative_config", None)
        if _is_lookahead(spec):
            # PoolingParams have no extra_args; pooling requests have nothing to check.
            check_request_options(getattr(params, "extra_args", None),
                                  spec.num_speculative_tokens)
        return result

    setattr(_validate_params, _MARK, True)
    _validate_params.__wrapped__ = original  # type: ignore[attr-defined]
    _validate_params.__doc__ = original.__doc__
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

    from vllm_lookahead import vllm_compat

    vllm_compat.check_vllm_version()
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise LookaheadConfigError(
            "VLLM_USE_V2_MODEL_RUNNER=1 forces vLLM's V2 model runner, which has no custom "
            "proposer support; lookahead runs on the V1 runner: unset VLLM_USE_V2_MODEL_RUNNER")
    fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    return translate_speculative_config(user, fields)


def _with_lookahead_choice(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_cli_args(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        for action in parser._actions:
            if "--spec-method" in action.option_strings and action.choices is not None \
                    and METHOD not in action.choices:
                action.choices = [*action.choices, METHOD]
        return parser

    setattr(add_cli_args, _MARK, True)
    return add_cli_args
