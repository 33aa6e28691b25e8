#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole default suite: ruff, unit and property tests, the
# real vLLM engine (LLM() and an OpenAI server subprocess), and a smoke run of the benchmark harness.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
# The benchmark harness end to end on the tiny model (a smoke test: its timings mean nothing).
.venv/bin/python -m benchmarks.run --quick --out "${TMPDIR:-/tmp}/vllm-lookahead-bench-quick"
# ... and with every method's engine loaded at once, the methods taking turns cell by cell.
.venv/bin/python -m benchmarks.run --quick --interleave \
    --out "${TMPDIR:-/tmp}/vllm-lookahead-bench-quick-interleaved"
