import os
import random
from pathlib import Path

import pytest

# Set before vLLM is imported anywhere: engine and worker processes inherit the environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets the tests read the proposer's counters from the worker with llm.collective_rpc(fn).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from tests.tiny_model import WORDS, ensure_tiny_model

MAX_MODEL_LEN = 1024
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="session")
def tiny_model() -> str:
    root = Path(os.environ.get("VLLM_LOOKAHEAD_TEST_CACHE",
                               Path.home() / ".cache" / "vllm-lookahead" / "tests"))
    return str(ensure_tiny_model(root / "tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def make_prompts(tokenizer, n: int = 44, seed: int = 0) -> list[list[int]]:
    """Prompts of 3 to ~300 tokens; every fourth repeats a phrase, so the model (and the pool)
    sees repetition and drafts get accepted."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        if i % 4 == 0:
            phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            text = " ".join([phrase] * rng.randint(2, 12))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 8, 20, 60, 150])))
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


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
