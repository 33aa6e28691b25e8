"""The plugin's loggers: children of vLLM's `vllm` logger, so they follow vLLM's logging setup.

vLLM configures only the `vllm` logger (its handler, level and format, in every process it starts:
front-end, EngineCore, workers). A logger named after this package (`vllm_lookahead.*`) would sit
beside it with no handler, and its INFO lines would never show. Named `vllm.lookahead.<module>`,
the plugin's lines go through vLLM's handler with vLLM's format and level, and follow
VLLM_CONFIGURE_LOGGING, VLLM_LOGGING_LEVEL, VLLM_LOGGING_CONFIG_PATH and `--log-config-file`
exactly as vLLM's own loggers do (with VLLM_CONFIGURE_LOGGING=0 they propagate to the root logger
like vLLM's). Knows nothing about vLLM beyond the logger name, so any module may use it.
"""

from __future__ import annotations

import logging

LOGGER_NAME = "vllm.lookahead"
_PACKAGE = "vllm_lookahead"


def get_logger(module_name: str) -> logging.Logger:
    """`get_logger(__name__)` in `vllm_lookahead.proposer` is the logger
    `vllm.lookahead.proposer`."""
    package, _, rest = module_name.partition(".")
    if package != _PACKAGE or not rest:
        return logging.getLogger(LOGGER_NAME)
    return logging.getLogger(f"{LOGGER_NAME}.{rest}")
