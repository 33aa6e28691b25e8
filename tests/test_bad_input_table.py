"""Every row of the refused-input tables in docs/configuration.md produces its documented error,
and every parameter and request option has a row (no engine is started)."""

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_lookahead.config import LookaheadConfig, RequestOptions

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ENGINE_K = 6  # the per-request table's engine


def table(title: str) -> list[tuple[str, str]]:
    section = DOC.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(.+)` \| `(.+)` \|$", section, flags=re.MULTILINE)
    assert rows, f"no rows under {title!r}"
    return rows


ENGINE_ROWS = table("Engine options: refused at start-up")
REQUEST_ROWS = table("Per-request options: refused per request")


def matches(documented: str, actual: str) -> bool:
    """`…` in the documented message stands for any text."""
    pattern = ".*".join(re.escape(part) for part in documented.split("…"))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


def engine_error(given: str, monkeypatch) -> str:
    from vllm_lookahead import plugin, proposer, vllm_boundary

    kind, _, rest = given.partition("=") if given.startswith(
        ("speculative_config", "async_scheduling")) else given.partition(" ")
    try:
        if kind == "speculative_config":
            plugin._validated(json.loads(rest))
        elif kind == "env":
            name, _, value = rest.partition("=")
            monkeypatch.setenv(name, value)
            if name == "VLLM_LOOKAHEAD_PARAMS":  # read by the zero-patch custom_class form
                proposer._config_for(SimpleNamespace(num_speculative_tokens=None))
            else:
                plugin._validated({"method": "lookahead"})
        elif kind == "vllm":
            import vllm

            monkeypatch.setattr(vllm, "__version__", rest)
            monkeypatch.delenv(vllm_boundary.ALLOW_UNTESTED_ENV, raising=False)
            vllm_boundary.require(vllm_boundary.Side.FRONT_END)
        elif kind == "async_scheduling":
            proposer.LookaheadProposer(fake_vllm_config(async_scheduling=rest == "True"))
        else:
            pytest.fail(f"unknown kind of row: {given}")
    except Exception as e:  # the message is what is checked
        return str(e)
    pytest.fail(f"{given} was accepted")


def fake_vllm_config(async_scheduling: bool):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling,
                                         max_num_batched_tokens=4096),
        speculative_config=SimpleNamespace(num_speculative_tokens=7, lookahead_params={}),
        model_config=SimpleNamespace(max_model_len=512, served_model_name="m"),
        device_config=SimpleNamespace(device_type="cpu"),
        parallel_config=SimpleNamespace(data_parallel_index=0, data_parallel_rank=0))


@pytest.mark.parametrize(("given", "error"), ENGINE_ROWS, ids=[r[0][:60] for r in ENGINE_ROWS])
def test_engine_row(given, error, monkeypatch):
    actual = engine_error(given, monkeypatch)
    assert matches(error, actual), f"documented: {error}\nactual:     {actual}"


@pytest.mark.parametrize(("given", "error"), REQUEST_ROWS, ids=[r[0][:60] for r in REQUEST_ROWS])
def test_request_row(given, error):
    from vllm_lookahead.plugin import LookaheadRequestError, check_request_options

    assert given.startswith("extra_args=")
    with pytest.raises(LookaheadRequestError) as err:
        check_request_options(json.loads(given.removeprefix("extra_args=")), ENGINE_K)
    assert matches(error, str(err.value)), f"documented: {error}\nactual:     {err.value}"


def test_every_parameter_and_option_has_a_row():
    engine_inputs = " ".join(given for given, _ in ENGINE_ROWS)
    for field in dataclasses.fields(LookaheadConfig):
        assert f'"{field.name}"' in engine_inputs or f'"lookahead_{field.name}"' in \
            engine_inputs, f"no refused-input row for lookahead parameter {field.name!r}"
    request_inputs = " ".join(given for given, _ in REQUEST_ROWS)
    for field in dataclasses.fields(RequestOptions):
        assert f'"{field.name}"' in request_inputs, f"no row for request option {field.name!r}"


def test_a_sound_proposer_config_passes_the_scheduling_check():
    from vllm_lookahead import engine_requests

    engine_requests.check_synchronous_scheduling(fake_vllm_config(async_scheduling=False))


def test_vllm_itself_refuses_async_scheduling_with_lookahead(tiny_model):
    """The first line of defence: vLLM refuses async scheduling for custom proposers, and
    otherwise turns it off for them."""
    from vllm.engine.arg_utils import EngineArgs

    spec = {"method": "lookahead", "num_speculative_tokens": 4}
    with pytest.raises(ValueError, match="async scheduling"):
        EngineArgs(model=tiny_model, max_model_len=512, async_scheduling=True,
                   speculative_config=spec).create_engine_config()
    config = EngineArgs(model=tiny_model, max_model_len=512,
                        speculative_config=spec).create_engine_config()
    assert config.scheduler_config.async_scheduling is False
