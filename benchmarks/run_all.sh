#!/usr/bin/env bash
# The published tables (benchmarks/README.md): every method at equal K=8 (ngram, suffix,
# lookahead), suffix also at vLLM's default K, `none` as the baseline, on all four prompt sets and
# the related workload, greedy, side by side in one run per model, with lookahead's ablation points
# next to its defaults (A=0: a fixed chain of K; S=0: no cross-request corpus; G=1: one
# continuation per pool key). Each concurrency sends its own prompts (disjoint slices of every
# set), so cross-request caches stay at their defaults. Sized for a 2-core CPU:
#   SmolLM2-135M, float32: 4 / 8 / 32 prompts per set at c=1 / 8 / 32, 96 new tokens
#     (about 55 minutes);
#   Qwen2.5-Coder-1.5B, bfloat16 (float32 runs at half its speed here; divergence from `none`
#     is reported): 4 prompts per set at c=1, 48 new tokens (about 25 minutes).
# The estimates are printed first (from reference rates; they assume every request generates all
# its tokens and every method runs as fast as `none`), then each cell reports progress.
#
#   bash benchmarks/run_all.sh              # both models
#   bash benchmarks/run_all.sh smollm2      # one of them (smollm2, qwen)
#   PLAN_ONLY=1 bash benchmarks/run_all.sh  # the plans and estimates only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-benchmarks/results}
SMOLLM2=(--model smollm2-135m --num-prompts 1:4,8:8,32:32 --max-tokens 96
         --concurrency 1,8,32 --lookahead-grid "A=0;S=0;G=1" --out "$OUT/smollm2-135m-k8")
QWEN=(--model qwen2.5-coder-1.5b --dtype bfloat16 --num-prompts 4 --max-tokens 48
      --concurrency 1 --methods none,lookahead,suffix,ngram
      --out "$OUT/qwen2.5-coder-1.5b-bf16-k8")
RUNS=("${@:-smollm2 qwen}")
read -r -a RUNS <<< "${RUNS[*]}"

args_of() {
    case "$1" in
        smollm2) ARGS=("${SMOLLM2[@]}") ;;
        qwen) ARGS=("${QWEN[@]}") ;;
        *) echo "unknown run $1 (smollm2, qwen)" >&2; exit 2 ;;
    esac
}

total=0
for run in "${RUNS[@]}"; do
    args_of "$run"
    echo "== $run: plan"
    plan=$($PY -m benchmarks.run "${ARGS[@]}" --plan)
    echo "$plan"
    seconds=$(sed -n 's/^estimated duration: .*(\([0-9]*\) s).*/\1/p' <<< "$plan")
    total=$((total + ${seconds:-0}))
done
printf '== estimated total: about %d h %02d min\n' $((total / 3600)) $((total % 3600 / 60))
if [[ -n "${PLAN_ONLY:-}" ]]; then exit 0; fi

for run in "${RUNS[@]}"; do
    args_of "$run"
    echo "== $run: $(date -u +%H:%M:%S) UTC"
    $PY -m benchmarks.run "${ARGS[@]}"
done
