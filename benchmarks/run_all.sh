#!/usr/bin/env bash
# The published tables (benchmarks/README.md), in one command: every method, both models, all four
# prompt sets, concurrency 1 and 8, greedy, side by side in one run per model. Sized for a 2-core
# CPU (about 45 minutes): SmolLM2-135M in float32, 5 prompts per set, 128 new tokens (the harness
# default is 256); Qwen2.5-Coder-1.5B runs at 2 tok/s in float32 here, so it runs in bfloat16
# (about 7 tok/s, divergence from `none` reported), 2 prompts per set, 64 new tokens. The first
# prompts of each set, in the sets' own order.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-benchmarks/results}
$PY -m benchmarks.run --model smollm2-135m --num-prompts 5 --max-tokens 128 --concurrency 1,8 \
    --lookahead-grid "A=0;N=3,W=0,A=0" --out "$OUT/smollm2-135m"
$PY -m benchmarks.run --model qwen2.5-coder-1.5b --dtype bfloat16 --num-prompts 2 \
    --max-tokens 64 --concurrency 1,8 --out "$OUT/qwen2.5-coder-1.5b-bf16"
