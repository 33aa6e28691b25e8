"""The `vllm.general_plugins` entry point: makes `method: "lookahead"` a speculative method.

vLLM's `SpeculativeConfig.method` is a closed Literal, and vLLM already routes `custom_class`
proposers the way lookahead needs (V1 runner, synchronous scheduling, no draft model). So the plugin
rewrites `{"method": "lookahead", ...}` into `{"method": "custom_class", "model":
"vllm_lookahead.proposer.LookaheadProposer", ...}` in `EngineArgs.create_speculative_config`, the
one funnel for `LLM(speculative_config=...)`, `--speculative-config` and `--spec-method`, and hangs
the validated lookahead parameters on the resulting config, which travels pickled to every engine
and worker process (Ray included). Worker-side hooks live in `vllm_compat`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from vllm_lookahead.config import (
    METHOD,
    PARAMS_ENV,
    LookaheadConfigError,
    translate_speculative_config,
)
from vllm_lookahead.log import get_logger

logger = get_logger(__name__)

_MARK = "_vllm_lookahead_hook"
PARAMS_ATTR = "lookahead_params"


def register() -> None:
    """Entry point; vLLM calls it in every process, possibly more than once."""
    from vllm.engine.arg_utils import EngineArgs

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
            return original(self, target_model_config, target_parallel_config)
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
        logger.info("vllm-lookahead: method 'lookahead' -> custom_class %s with %s",
                    spec_dict["model"], params)
        return spec

    setattr(create_speculative_config, _MARK, True)
    create_speculative_config.__doc__ = original.__doc__
    return create_speculative_config


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
