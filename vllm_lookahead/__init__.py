"""Lookahead Decoding (Fu et al., ICML 2024) as a draft-model-free speculative method for vLLM."""

from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError, RequestOptions
from vllm_lookahead.metrics import engine_stats

__version__ = "0.1.0"
__all__ = ["LookaheadConfig", "LookaheadConfigError", "RequestOptions", "engine_stats",
           "register"]


def register() -> None:
    """`vllm.general_plugins` entry point (kept import-light: vLLM loads it in every process)."""
    from vllm_lookahead.plugin import register as _register

    _register()
