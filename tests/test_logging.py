"""The plugin's log lines go through vLLM's logging configuration (no engine; the server and LLM
paths are in test_observability.py)."""

import importlib
import io
import json
import logging
import pkgutil

import vllm_lookahead
from vllm_lookahead.log import LOGGER_NAME, get_logger


def all_modules():
    return [importlib.import_module(m.name)
            for m in pkgutil.walk_packages(vllm_lookahead.__path__, "vllm_lookahead.")]


def test_every_module_logs_under_vllms_logger():
    """A `logging.getLogger(__name__)` would sit outside vLLM's `vllm` logger, with no handler:
    its INFO lines would never show. Use `vllm_lookahead.log.get_logger(__name__)`."""
    loggers = {f"{module.__name__}.{name}": value for module in all_modules()
               for name, value in vars(module).items() if isinstance(value, logging.Logger)}
    # The modules that log hold their logger at module level: none found means none was checked.
    assert "vllm_lookahead.proposer.logger" in loggers
    for where, value in loggers.items():
        assert value.name.startswith(LOGGER_NAME + "."), f"{where} logs as {value.name!r}"
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


def test_a_custom_logging_config_file_governs_the_plugins_lines(tmp_path):
    """VLLM_LOGGING_CONFIG_PATH / --log-config-file: a dictConfig that names only `vllm` (and, by
    dictConfig's default, disables every logger it does not name or contain) still carries the
    plugin's lines, since they are `vllm.*` loggers."""
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    log_file = tmp_path / "vllm.log"
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1,
        "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file),
                              "formatter": "plain"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "DEBUG", "propagate": False}},
    }))
    loggers = [x for x in logging.Logger.manager.loggerDict.values()
               if isinstance(x, logging.Logger)]
    disabled = {x: x.disabled for x in loggers}
    try:
        configure_logging(LoggingConfig(pylogging_config_file=str(config)))
        get_logger("vllm_lookahead.metrics").debug("debug line from the plugin")
        for handler in logging.getLogger("vllm").handlers:
            handler.flush()
    finally:
        configure_logging(LoggingConfig(log_level="WARNING"))
        for x, was in disabled.items():  # the test config disabled the loggers it did not name
            x.disabled = was
    assert "vllm.lookahead.metrics DEBUG debug line from the plugin" in log_file.read_text()
