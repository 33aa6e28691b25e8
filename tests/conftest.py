import os
from pathlib import Path

import pytest

# Set before vLLM is imported anywhere: engine and worker processes inherit the environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from benchmarks.tiny_model import make_prompts
from benchmarks.tiny_model import tiny_model as build_tiny_model

MAX_MODEL_LEN = 1024
MAX_NEW_TOKENS = 48
INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"


@pytest.fixture(scope="module")
def functions_to_workers():
    """For the modules whose tests send a function to vLLM's workers (`collective_rpc(fn)`),
    which vLLM serializes with pickle only when VLLM_ALLOW_INSECURE_SERIALIZATION is set: set
    before the module's engines start (`pytest.mark.usefixtures`), unset after. The plugin
    itself never needs it (`vllm_lookahead.engine_stats` reads the counters without RPC)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INSECURE_SERIALIZATION, "1")
        yield


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(build_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    return make_prompts(tokenizer)


def make_llm(model: str, speculative_config=None, **kwargs):
    from vllm import LLM

    return LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
               seed=0, speculative_config=speculative_config, **kwargs)


def greedy_params(max_tokens: int = MAX_NEW_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate_tokens(llm, prompts, params, one_at_a_time: bool = False) -> list[list[int]]:
    requests = [{"prompt_token_ids": p} for p in prompts]
    if one_at_a_time:
        outs = [llm.generate([r], params, use_tqdm=False)[0] for r in requests]
    else:
        outs = llm.generate(requests, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def baseline(tiny_model, prompts) -> list[list[int]]:
    """Greedy outputs of vLLM without speculation: the reference every lookahead run must match."""
    llm = make_llm(tiny_model)
    try:
        return generate_tokens(llm, prompts, greedy_params())
    finally:
        shutdown(llm)


def first_difference(expected: list[list[int]], actual: list[list[int]]) -> str | None:
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e != a:
            pos = next((j for j, (x, y) in enumerate(zip(e, a, strict=False)) if x != y),
                       min(len(e), len(a)))
            return f"prompt {i}: first difference at output token {pos}: {e[pos:pos + 5]} vs " \
                   f"{a[pos:pos + 5]}"
    return None


def write_jsonl(path: Path, lines: list[str]) -> Path:
    """A prompt file in vLLM's `custom` dataset format, one JSON text a line."""
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
