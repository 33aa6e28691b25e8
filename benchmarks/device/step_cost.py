"""Milliseconds per engine step on a GPU, with and without lookahead, for a model too large to
carry to the lent GPU: random weights (``load_format="dummy"``) in the real model's shape, prompts
as token ids, no tokenizer. Random weights make a meaningless (often repetitive) output, so this
measures what a decode step costs (proposer + verifying K tokens), not what lookahead gains; tokens
per forward come from the real models in ``benchmarks/results``. CUDA graphs on, as users run.
A decode step's time excludes the prefill and the per-call overhead: a run of one token is timed
and subtracted.

Usage: ``python -m benchmarks.device.step_cost MODEL_DIR OUT.json`` (MODEL_DIR holds only a
config.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "lookahead": {"method": "lookahead", "lookahead": {"adaptive": False}},
}
BATCHES = (1, 16)
MAX_TOKENS = 512
PROMPT_LEN = 256


def _engine_steps(llm: Any) -> int:
    """Engine iterations so far: vLLM observes its tokens-per-iteration histogram once per step."""
    return sum(int(m.count) for m in llm.get_metrics() if m.name == "vllm:iteration_tokens_total")


def _timed_generate(llm: Any, prompts: list[dict[str, Any]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started


def measure(model: str, method: str) -> dict[str, Any]:
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=PROMPT_LEN + MAX_TOKENS + 64, max_num_seqs=max(BATCHES),
              gpu_memory_utilization=0.8, enable_prefix_caching=False, disable_log_stats=False,
              speculative_config=METHODS[method])
    result: dict[str, Any] = {"method": method, "engine_start_s": time.perf_counter() - started}
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    for batch in BATCHES:
        prompts = [{"prompt_token_ids": [(101 + 7 * i + 13 * j) % vocab
                                         for i in range(PROMPT_LEN)]} for j in range(batch)]
        _timed_generate(llm, prompts, 16)  # warm-up
        before = _engine_steps(llm)
        prefill_s = _timed_generate(llm, prompts, 1)
        prefill_steps = _engine_steps(llm) - before
        before = _engine_steps(llm)
        wall = _timed_generate(llm, prompts, MAX_TOKENS)
        # Requests accept different amounts, so they finish at different steps: count the
        # engine's own iterations, not tokens per request.
        steps = _engine_steps(llm) - before - prefill_steps
        result[f"batch{batch}"] = {"wall_s": wall, "prefill_s": prefill_s, "decode_steps": steps,
                                   "ms_per_step": 1000 * (wall - prefill_s) / steps}
    return result


SHAPE_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size")


def main() -> None:
    if sys.argv[1] == "--one":
        Path(sys.argv[4]).write_text(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    model, out = sys.argv[1], Path(sys.argv[2])
    rows = []
    for method in METHODS:
        row = out.with_suffix(f".{method}.json")
        # One process per engine, so each gets the whole GPU.
        run = subprocess.run([sys.executable, "-m", "benchmarks.device.step_cost", "--one", model,
                              method, str(row)], check=False)
        if run.returncode != 0:
            print(f"step_cost: {method} failed (exit {run.returncode})", flush=True)
            continue
        rows.append(json.loads(row.read_text()))
        row.unlink()
        print(rows[-1], flush=True)
    import vllm

    from benchmarks.engine import accelerator_name

    device = accelerator_name("cuda") or "cpu"
    config = json.loads((Path(model) / "config.json").read_text())
    out.write_text(json.dumps({"device": device, "vllm": vllm.__version__,
                               "model_shape": {k: config.get(k) for k in SHAPE_KEYS},
                               "rows": rows}, indent=1) + "\n")
    if len(rows) < len(METHODS):
        sys.exit(f"step_cost: {len(METHODS) - len(rows)} of {len(METHODS)} methods failed")


if __name__ == "__main__":
    main()
