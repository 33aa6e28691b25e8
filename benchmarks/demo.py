"""Lookahead decoding next to plain decoding on a real model: the same outputs, and how fast.

    python -m benchmarks.demo [--model smollm2-135m] [--num-prompts 7] [--max-tokens 128]

Takes prompts from mtbench, humaneval, gsm8k and summarization in turn, generates greedily in
float32, one request at a time, with vLLM without speculation and then with lookahead (default
settings), and prints the outputs side by side and a small table. The first run downloads and
converts the model and the prompt sets (cached; a few minutes).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks import engine as eng
from benchmarks.datasets import chat_prompts
from benchmarks.figures import summarize
from benchmarks.labels import BASELINE
from benchmarks.methods import Method
from benchmarks.models import DEFAULT_MODEL, MODELS
from benchmarks.run import measure

DEMO_SETS = ("mtbench", "humaneval", "gsm8k", "summarization")
# The plugin's own defaults, K included.
LOOKAHEAD = Method("lookahead", {"method": "lookahead"})
_PREVIEW_CHARS = 70


def demo_prompts(tokenizer: Any, count: int) -> list[tuple[str, list[int]]]:
    """`count` prompts, taken from the sets in turn: 7 gives two of each and one summary."""
    per_set = -(-count // len(DEMO_SETS))
    sets = {name: chat_prompts(name, tokenizer, per_set) for name in DEMO_SETS}
    return [(name, sets[name][i]) for i in range(per_set) for name in DEMO_SETS][:count]


def preview(text: str) -> str:
    return " ".join(text.split())[:_PREVIEW_CHARS]


def print_outputs(names: Sequence[str], base: eng.Batch, ours: eng.Batch) -> None:
    for i, (name, a, b) in enumerate(zip(names, base.outputs, ours.outputs, strict=True)):
        if a.token_ids == b.token_ids:
            verdict = "identical"
        else:
            verdict = next((f"DIFFERENT from token {j}" for j, (x, y)
                            in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                           "DIFFERENT length")
        print(f"\n#{i + 1} {name:<14} {len(a.token_ids)} tokens, {verdict}")
        print(f"   {BASELINE:<10} | {preview(a.text)}")
        print(f"   {LOOKAHEAD.name:<10} | {preview(b.text)}")


def print_table(base: dict[str, Any], ours: dict[str, Any]) -> None:
    def line(label: str, key: str, spec: str) -> str:
        cells = ["-" if r[key] is None else format(r[key], spec) for r in (base, ours)]
        return f"{label:<28}{cells[0]:>10}{cells[1]:>12}"

    print(f"\n{'':<28}{BASELINE:>10}{LOOKAHEAD.name:>12}")
    print(line("output tokens/s", "tokens_per_s", ".1f"))
    print(line("speed ratio", "speedup", ".2f"))
    print(line("tokens per target forward", "tokens_per_forward", ".2f"))
    print(line("draft acceptance rate", "acceptance_rate", ".1%"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--num-prompts", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    eng.configure_env()

    model = eng.resolve_model(args.model)
    tokenizer = eng.load_tokenizer(model)
    named = demo_prompts(tokenizer, args.num_prompts)
    prompts = [p for _, p in named]
    plan = {"demo": {1: prompts}}
    cfg = eng.EngineConfig(model=model, dtype="float32", max_num_seqs=1, seed=0,
                           max_model_len=eng.model_len_for(prompts, tokenizer, args.max_tokens),
                           enforce_eager=True)
    params = eng.greedy(args.max_tokens, seed=0)
    # One engine after the other, each measured alone on the machine.
    (base,), _ = measure(Method(BASELINE, None), cfg, plan, params, tokenizer)
    (ours,), _ = measure(LOOKAHEAD, cfg, plan, params, tokenizer)

    print(f"\n=== {args.model}, float32, greedy, one request at a time, "
          f"at most {args.max_tokens} tokens")
    print_outputs([name for name, _ in named], base.batch, ours.batch)
    print_table(summarize([base], [base]), summarize([ours], [base]))


if __name__ == "__main__":
    main()
