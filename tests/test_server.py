"""The OpenAI-compatible server as users start it, in a subprocess, queried with `openai`."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.engine

SPEC = {"method": "lookahead", "num_speculative_tokens": 6, "lookahead": {"ngram_size": 3}}
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0", *extra]


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not become healthy")


Samples = dict[tuple[str, frozenset], float]


def metric_samples(port: int) -> Samples:
    """The server's /metrics as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample_values(samples: Samples, name: str) -> list[float]:
    """The values of every sample of `name`, whatever its labels."""
    return [value for (sample, _), value in samples.items() if sample == name]


@contextlib.contextmanager
def serving(argv: list[str], port: int, log: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A server started with `argv` (listening on `port`, its output in `log`), once healthy;
    stopped on exit. Where anything fails meanwhile, the end of its log is printed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=env if env is not None else os.environ.copy())
    try:
        wait_healthy(proc, port)
        yield proc
    except Exception:
        print(log.read_text()[-5000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(server_command(tiny_model, port, "--speculative-config", json.dumps(SPEC)),
                 port, log):
        yield port


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


# Token ids, not text: the tiny byte-level tokenizer makes invalid UTF-8 from random outputs,
# which the server's incremental detokenizer renders differently from a one-shot decode.
GREEDY = {"ignore_eos": True, "return_token_ids": True}


def token_ids(choice) -> list[int]:
    return getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids") or []


def test_completions_match_decoding_without_speculation(client, model_name, prompts, baseline):
    for prompt, expected in list(zip(prompts, baseline, strict=True))[:8]:
        resp = client.completions.create(model=model_name, prompt=prompt, max_tokens=48,
                                         temperature=0, extra_body=GREEDY)
        assert token_ids(resp.choices[0]) == expected


def test_streaming_yields_the_same_tokens(client, model_name, prompts, baseline):
    stream = client.completions.create(model=model_name, prompt=prompts[4], max_tokens=48,
                                       temperature=0, stream=True, extra_body=GREEDY)
    chunks = list(stream)
    assert len(chunks) > 1
    assert [t for c in chunks for t in token_ids(c.choices[0])] == baseline[4]


def test_chat_completions_match(client, model_name, tokenizer, tiny_model):
    from tests.conftest import generate_tokens, greedy_params, make_llm, shutdown

    messages = [{"role": "user", "content": "the cat sat on the mat the cat sat on the mat"}]
    resp = client.chat.completions.create(model=model_name, messages=messages, max_tokens=40,
                                          temperature=0, extra_body=GREEDY)
    chat = token_ids(resp.choices[0])
    streamed = [
        t for c in client.chat.completions.create(model=model_name, messages=messages,
                                                  max_tokens=40, temperature=0, stream=True,
                                                  extra_body=GREEDY)
        if c.choices for t in token_ids(c.choices[0])]
    assert len(chat) == 40
    assert streamed == chat
    prompt_ids = getattr(resp, "prompt_token_ids", None) or resp.model_extra["prompt_token_ids"]
    assert tokenizer.decode(prompt_ids).endswith("<|assistant|>")
    llm = make_llm(tiny_model)
    try:
        (expected,) = generate_tokens(llm, [prompt_ids], greedy_params(40))
    finally:
        shutdown(llm)
    assert chat == expected


def test_server_exports_speculative_metrics(server, client, model_name, prompts):
    client.completions.create(model=model_name, prompt=prompts[0], max_tokens=32, temperature=0)
    accepted = sample_values(metric_samples(server), "vllm:spec_decode_num_accepted_tokens_total")
    assert accepted and accepted[0] > 0


def test_a_seeded_request_gets_the_same_tokens_after_other_traffic(client, model_name, prompts):
    """The same seeded completion before and after the server has served, and learned from,
    unseeded sampled requests: the same tokens."""
    from concurrent.futures import ThreadPoolExecutor

    def complete(prompt, seed=None):
        resp = client.completions.create(model=model_name, prompt=prompt, max_tokens=32,
                                         temperature=0.8, top_p=0.95, seed=seed,
                                         extra_body=GREEDY)
        return token_ids(resp.choices[0])

    before = complete(prompts[2], seed=77)
    with ThreadPoolExecutor(8) as pool:
        unseeded = list(pool.map(complete, prompts[10:17]))
    after = complete(prompts[2], seed=77)
    assert len(before) == 32
    assert after == before
    assert len({tuple(t) for t in unseeded}) > 1


@pytest.mark.parametrize("launcher", ["module", "vllm-lookahead"])
def test_bad_config_stops_the_server_at_startup_with_one_clear_message(tiny_model, launcher):
    bad = json.dumps({"method": "lookahead", "lookahead_ngram_size": 1})
    if launcher == "module":
        cmd = server_command(tiny_model, free_port(), "--speculative-config", bad)
    else:
        cmd = [str(VENV_BIN / "vllm-lookahead"), "serve", tiny_model, "--port",
               str(free_port()), "--speculative-config", bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "LookaheadConfigError: lookahead parameter 'ngram_size'=1 is out of range: valid " \
           "range is [2, 16]" in proc.stderr
