"""The plugin's log lines go through vLLM's logging configuration (no engine; the server and LLM
paths are in test_observability.py)."""

import importlib
import io
import logging
import pkgutil

import vllm_lookahead
from vllm_lookahead.log import LOGGER_NAME, get_logger


def all_modules():
    return [importlib.import_module(m.name)
            for m in pkgutil.iter_modules(vllm_lookahead.__path__, "vllm_lookahead.")]


def test_every_module_logs_under_vllms_logger():
    """A `logging.getLogger(__name__)` would sit outside vLLM's `vllm` logger, with no handler:
    its INFO lines would never show. Use `vllm_lookahead.log.get_logger(__name__)`."""
    for module in all_modules():
        for name, value in vars(module).items():
            if isinstance(value, logging.Logger):
                assert value.name.startswith(LOGGER_NAME + "."), \
                    f"{module.__name__}.{name} logs as {value.name!r}"
    assert not [n for n in logging.Logger.manager.loggerDict if n.startswith("vllm_lookahead")]


def test_names():
    assert get_logger("vllm_lookahead.proposer").name == "vllm.lookahead.proposer"
    assert get_logger("vllm_lookahead").name == "vllm.lookahead"
    assert get_logger("somewhere.else").name == "vllm.lookahead"


def test_lines_take_vllms_handler_format_and_level():
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    previous = logging.getLogger("vllm").level
    configure_logging(LoggingConfig(log_level="INFO"))
    stream = io.StringIO()
    (handler,) = logging.getLogger("vllm").handlers
    handler.setStream(stream)
    try:
        get_logger("vllm_lookahead.proposer").info("Lookahead decoding: %s", "test line")
        get_logger("vllm_lookahead.proposer").debug("not at INFO")
    finally:
        configure_logging(LoggingConfig(log_level=logging.getLevelName(previous)
                                        if previous else "WARNING"))
    line = stream.getvalue()
    assert "Lookahead decoding: test line" in line
    assert "INFO" in line and "[test_logging.py:" in line  # vLLM's format: level, file:line
    assert "not at INFO" not in line
