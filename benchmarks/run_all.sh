#!/usr/bin/env bash
# The published tables (benchmarks/README.md): every method at equal K=8 (ngram, suffix,
# lookahead), suffix also at vLLM's default K, `none` as the baseline, on all four prompt sets and
# the related workload, greedy, side by side in one run per model and concurrency. Sized for a
# 2-core CPU:
#   smollm2-c1:  SmolLM2-135M, float32, one request in flight, 4 prompts per set, 96 new tokens,
#                with lookahead's ablation points next to its defaults (A=0: a fixed chain of K;
#                S=0: no cross-request corpus; G=1: one continuation per pool key);
#   smollm2-c8:  the same model, a steady stream: 32 prompts per set, 8 in flight, finished
#                requests replaced, so the engine runs full for most of each cell;
#   smollm2-c32: the same, 64 prompts per set with 32 in flight;
#   qwen:        Qwen2.5-Coder-1.5B, bfloat16 (float32 runs at half its speed here; divergence
#                from `none` is reported), 4 prompts per set at c=1, 48 new tokens.
# About 1 h 25 min in all. Not in the default list, for gaps smaller than this machine's
# run-to-run noise (about 10 %): the same streams in three paired rounds (--rounds 3: fresh
# engines each round, the order reversed every other round), `none`, lookahead and suffix only:
#   smollm2-c1-rounds (one request in flight, 4 prompts per set, suffix also at its default K),
#   smollm2-c8-rounds, smollm2-c32-rounds  (about 27, 21 and 30 min);
#   qwen-c8 and qwen-c32 (Qwen bf16, 16 prompts per set with 8 in flight and 32 with 32, 48 new
#   tokens, the methods at equal K; about 21 and 36 min); smollm2-extra (the four held-out-like
#   kinds that rework the prompt's text, code-edit, extract, bullets, followup: c=1, 6 prompts
#   each, two paired rounds, every method and the fixed chain; about 19 min);
#   smollm2-c32-interleaved and qwen-c32-interleaved (lookahead and `none` alone at c=32, three
#   rounds with the engines loaded at once, the methods taking turns cell by cell; SmolLM2's with
#   `none-control`, a second `none` engine whose ratio to the first is the run's resolution;
#   about 27 and 28 min).
# The estimates are printed first (from reference rates; they assume
# every request generates all its tokens and every method runs as fast as `none`), then each cell
# reports progress.
#
#   bash benchmarks/run_all.sh                        # every run
#   bash benchmarks/run_all.sh smollm2                # smollm2-c1, smollm2-c8 and smollm2-c32
#   bash benchmarks/run_all.sh smollm2-c8 qwen        # some of them
#   PLAN_ONLY=1 bash benchmarks/run_all.sh            # the plans and estimates only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-benchmarks/results}
# c=1 also runs suffix at vLLM's default K (the harness's default methods); the streams, the
# longest runs, only the methods at equal K.
SMOLLM2=(--model smollm2-135m --max-tokens 96)
SMOLLM2_C1=("${SMOLLM2[@]}" --num-prompts 4 --concurrency 1 --lookahead-grid "A=0;S=0;G=1"
            --out "$OUT/smollm2-135m-k8-c1")
STREAM=("${SMOLLM2[@]}" --methods none,lookahead,suffix,ngram)
SMOLLM2_C8=("${STREAM[@]}" --num-prompts 32 --concurrency 8 --out "$OUT/smollm2-135m-k8-c8")
SMOLLM2_C32=("${STREAM[@]}" --num-prompts 64 --concurrency 32 --out "$OUT/smollm2-135m-k8-c32")
ROUNDS=("${SMOLLM2[@]}" --methods none,lookahead,suffix --rounds 3)
SMOLLM2_C1_ROUNDS=("${SMOLLM2[@]}" --methods none,lookahead,suffix,suffix-default --rounds 3
                   --num-prompts 4 --concurrency 1
                   --out "$OUT/smollm2-135m-k8-c1-rounds")
SMOLLM2_C8_ROUNDS=("${ROUNDS[@]}" --num-prompts 32 --concurrency 8
                   --out "$OUT/smollm2-135m-k8-c8-rounds")
SMOLLM2_C32_ROUNDS=("${ROUNDS[@]}" --num-prompts 64 --concurrency 32
                    --out "$OUT/smollm2-135m-k8-c32-rounds")
# Lookahead against `none` alone at c=32, each round's engines loaded at once and taking turns
# cell by cell (--interleave): a cell's halves run back to back, not a method run apart. The
# control (a second `none`) shows how far two identical engines of the run differ.
SMOLLM2_C32_INTERLEAVED=("${SMOLLM2[@]}" --methods none,none-control,lookahead --rounds 3
                         --interleave --num-prompts 64 --concurrency 32
                         --out "$OUT/smollm2-135m-k8-c32-la-interleaved")
QWEN_C32_INTERLEAVED=(--model qwen2.5-coder-1.5b --dtype bfloat16 --max-tokens 48
                      --methods none,lookahead --rounds 3 --interleave --num-prompts 32
                      --concurrency 32 --out "$OUT/qwen2.5-coder-1.5b-bf16-k8-c32-la-interleaved")
QWEN_MODEL=(--model qwen2.5-coder-1.5b --dtype bfloat16 --max-tokens 48
            --methods none,lookahead,suffix,ngram)
QWEN=("${QWEN_MODEL[@]}" --num-prompts 4 --concurrency 1 --out "$OUT/qwen2.5-coder-1.5b-bf16-k8")
QWEN_C8=("${QWEN_MODEL[@]}" --num-prompts 16 --concurrency 8
         --out "$OUT/qwen2.5-coder-1.5b-bf16-k8-c8")
QWEN_C32=("${QWEN_MODEL[@]}" --num-prompts 32 --concurrency 32
          --out "$OUT/qwen2.5-coder-1.5b-bf16-k8-c32")
SMOLLM2_EXTRA=("${SMOLLM2[@]}" --datasets code-edit,extract,bullets,followup --num-prompts 6
               --concurrency 1 --methods none,ngram,suffix,suffix-default,lookahead
               --lookahead-grid A=0 --rounds 2 --out "$OUT/smollm2-135m-k8-c1-extra-kinds")
RUNS=()
for run in ${@:-smollm2 qwen}; do
    if [[ $run == smollm2 ]]; then RUNS+=(smollm2-c1 smollm2-c8 smollm2-c32); else RUNS+=("$run"); fi
done

args_of() {
    case "$1" in
        smollm2-c1) ARGS=("${SMOLLM2_C1[@]}") ;;
        smollm2-c8) ARGS=("${SMOLLM2_C8[@]}") ;;
        smollm2-c32) ARGS=("${SMOLLM2_C32[@]}") ;;
        smollm2-c1-rounds) ARGS=("${SMOLLM2_C1_ROUNDS[@]}") ;;
        smollm2-c8-rounds) ARGS=("${SMOLLM2_C8_ROUNDS[@]}") ;;
        smollm2-c32-rounds) ARGS=("${SMOLLM2_C32_ROUNDS[@]}") ;;
        qwen) ARGS=("${QWEN[@]}") ;;
        qwen-c8) ARGS=("${QWEN_C8[@]}") ;;
        qwen-c32) ARGS=("${QWEN_C32[@]}") ;;
        smollm2-extra) ARGS=("${SMOLLM2_EXTRA[@]}") ;;
        smollm2-c32-interleaved) ARGS=("${SMOLLM2_C32_INTERLEAVED[@]}") ;;
        qwen-c32-interleaved) ARGS=("${QWEN_C32_INTERLEAVED[@]}") ;;
        *) echo "unknown run $1 (smollm2, smollm2-c1, smollm2-c8, smollm2-c32, qwen," \
                "smollm2-c1-rounds, smollm2-c8-rounds, smollm2-c32-rounds, qwen-c8," \
                "qwen-c32, smollm2-extra, smollm2-c32-interleaved, qwen-c32-interleaved)" >&2
           exit 2 ;;
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
