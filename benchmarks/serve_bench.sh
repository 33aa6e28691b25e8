#!/usr/bin/env bash
# vLLM's own client on your prompts: for each method, the OpenAI server started the same way
# (`vllm-lookahead serve`, only the speculative config differs, K draft tokens at most), warmed
# up, measured with `vllm-lookahead bench serve --dataset-name custom` at each concurrency, and
# stopped; then one side-by-side table of TTFT, TPOT, ITL, throughput and acceptance.
#
#   bash benchmarks/serve_bench.sh MODEL FILE.jsonl [CONCURRENCIES] [METHODS]
#   bash benchmarks/serve_bench.sh smollm2-135m my-prompts.jsonl 1,8 none,ngram,suffix,lookahead
#
# MODEL: a Hugging Face folder or id, or a benchmark model's name (smollm2-135m, tiny, ...).
# FILE.jsonl: vLLM's custom dataset format, a {"prompt": ...} object per line (the same file
# `python -m benchmarks.run --prompts` reads); each prompt is sent once, in the chat template.
# Each concurrency gets its own consecutive slice of the file, as in the harness: a server never
# sees a prompt twice, so suffix's and lookahead's caches of earlier responses can only recall
# other requests' answers. Defaults: concurrencies 1,8; methods none,ngram,suffix,lookahead.
#
# ROUNDS=R [1] runs it all R times, each round on fresh servers over the same prompts, the order
# of the methods reversed every other round (the harness's --rounds), and pairs each method with
# none's figures of the same round: on a noisy machine a difference counts only if the rounds
# agree on it.
#
# Environment (defaults in brackets): NUM_PROMPTS prompts per concurrency, at least N and raised
# to c, or c:N,c:N [4]; OUTPUT_LEN tokens per request, -1 for each line's output_tokens [128];
# K [8]; DTYPE [float32]; SEED [0]; EAGER 1/0 [1]; VLLM_CPU_KVCACHE_SPACE GiB [4];
# SERVER_TIMEOUT seconds to become healthy [600]; SERVER_ARGS more server flags, word-split [];
# OUT results folder [benchmarks/results/tmp/serve-<model>-<time>]. Greedy (temperature 0),
# prefix caching off (every prefill costs the same whichever prompts came before), at most
# max(CONCURRENCIES) requests per batch. A method whose server does not start is skipped.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
[[ $# -ge 2 && $# -le 4 ]] || usage

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${VENV_BIN:-$ROOT/.venv/bin}
MODEL=$1
[[ -e $MODEL ]] && MODEL=$(realpath "$MODEL")
[[ -f $2 ]] || { echo "serve_bench: $2: no such file" >&2; exit 2; }
PROMPTS=$(realpath "$2")
CONCURRENCIES=${3:-1,8}
METHODS=${4:-none,ngram,suffix,lookahead}
NUM_PROMPTS=${NUM_PROMPTS:-4}
OUTPUT_LEN=${OUTPUT_LEN:-128}
K=${K:-8}
DTYPE=${DTYPE:-float32}
SEED=${SEED:-0}
EAGER=${EAGER:-1}
SERVER_TIMEOUT=${SERVER_TIMEOUT:-600}
SERVER_ARGS=${SERVER_ARGS:-}
ROUNDS=${ROUNDS:-1}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "serve_bench: ROUNDS=$ROUNDS: a positive number" >&2; exit 2; }
OUT=$(realpath -m "${OUT:-$ROOT/benchmarks/results/tmp/serve-$(basename "$MODEL")-$(date +%Y%m%d-%H%M%S)}")
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
cd "$ROOT"

# The plan checks the prompts and writes each cell's slice before any server starts.
PLAN=$("$BIN/python" -m benchmarks.serve_bench plan "$MODEL" "$PROMPTS" --out "$OUT" \
    --concurrency "$CONCURRENCIES" --methods "$METHODS" --num-prompts "$NUM_PROMPTS" \
    --output-len "$OUTPUT_LEN" --k "$K")
CELLS=() NAMES=() CONFIGS=()
while IFS=$'\t' read -r kind a b c; do
    case $kind in
        model) MODEL_PATH=$a ;;
        max_model_len) MAX_MODEL_LEN=$a ;;
        warmup) WARMUP_COUNT=$a WARMUP_FILE=$b ;;
        cell) CELLS+=("$a $b $c") ;;
        method) NAMES+=("$a") CONFIGS+=("$b") ;;
    esac
done <<<"$PLAN"
MAX_SEQS=$((WARMUP_COUNT))  # the warm-up sends max(CONCURRENCIES) requests at once

SERVER_PID=
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    # The server runs in its own process group (setsid), which holds its engine processes too.
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 -- "-$SERVER_PID" 2>/dev/null || break
        sleep 1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server PORT LOG [SPECULATIVE_CONFIG]: the same flags for every method.
start_server() {
    local args=(serve "$MODEL_PATH" --host 127.0.0.1 --port "$1" --dtype "$DTYPE"
        --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_SEQS" --seed "$SEED"
        --no-enable-prefix-caching)
    [[ $EAGER == 1 ]] && args+=(--enforce-eager)
    [[ -n ${3:-} ]] && args+=(--speculative-config "$3")
    # shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
    setsid "$BIN/vllm-lookahead" "${args[@]}" $SERVER_ARGS >"$2" 2>&1 &
    SERVER_PID=$!
}

wait_healthy() {
    local deadline=$((SECONDS + SERVER_TIMEOUT))
    while ((SECONDS < deadline)); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        sleep 2
    done
    return 1
}

# bench PORT PROMPT_FILE COUNT CONCURRENCY OUTPUT_LEN LOG [vLLM bench flags...]
bench() {
    local port=$1 file=$2 count=$3 concurrency=$4 output_len=$5 log=$6
    shift 6
    "$BIN/vllm-lookahead" bench serve --backend openai --host 127.0.0.1 --port "$port" \
        --endpoint /v1/completions --model "$MODEL_PATH" --dataset-name custom \
        --dataset-path "$file" --num-prompts "$count" --max-concurrency "$concurrency" \
        --custom-output-len "$output_len" --temperature 0 --seed "$SEED" --disable-shuffle \
        --no-oversample --disable-tqdm "$@" >>"$log" 2>&1
}

# run_method ROUND INDEX: one method's server, warm-up and cells.
run_method() {
    local round=$1 name=${NAMES[$2]} config=${CONFIGS[$2]} tag
    local safe=${name//[^A-Za-z0-9._-]/_}
    tag=$([[ $ROUNDS == 1 ]] || echo "-r$round")
    local port log="$OUT/$safe$tag-bench.log"
    port=$(free_port)
    echo "== $name${tag:+ (round $round)}: starting the server${config:+ with $config}"
    start_server "$port" "$OUT/$safe$tag-server.log" "$config"
    if ! wait_healthy "$port"; then
        echo "== $name: skipped: the server did not start (last lines of $OUT/$safe$tag-server.log):"
        tail -n 5 "$OUT/$safe$tag-server.log" | sed 's/^/   /'
        SKIPPED+=("$name${tag:+ (round $round)}: not run, the server did not start (see $OUT/$safe$tag-server.log)")
        stop_server
        return
    fi
    # Warm-up on prompts of its own, all in flight at once: first calls (and compilation, such
    # as ngram's numba kernels) are paid before any measurement.
    if ! bench "$port" "$WARMUP_FILE" "$WARMUP_COUNT" "$WARMUP_COUNT" 16 "$log"; then
        echo "== $name: skipped: its warm-up failed (see $log)"
        SKIPPED+=("$name${tag:+ (round $round)}: not run, the warm-up failed (see $log)")
        stop_server
        return
    fi
    for cell in "${CELLS[@]}"; do
        read -r concurrency count file <<<"$cell"
        # No ready check: its test request would send the cell's first prompt twice.
        if bench "$port" "$file" "$count" "$concurrency" "$OUTPUT_LEN" "$log" \
            --ready-check-timeout-sec 0 --percentile-metrics ttft,tpot,itl \
            --metric-percentiles 50,99 --save-result --result-dir "$OUT" \
            --result-filename "$safe-c$concurrency$tag.json" \
            --metadata "method=$name" "speculative_config=${config:-none}" "round=$round"; then
            echo "   c=$concurrency: $count requests done"
        else
            echo "   c=$concurrency: vllm bench serve failed (see $log)"
        fi
    done
    stop_server
}

SKIPPED=()
echo "results in $OUT; model $MODEL_PATH, max-model-len $MAX_MODEL_LEN, ${#NAMES[@]} methods, $ROUNDS round(s)"
for round in $(seq "$ROUNDS"); do
    order=("${!NAMES[@]}")
    if ((round % 2 == 0)); then
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do run_method "$round" "${order[$i]}"; done
    else
        for i in "${order[@]}"; do run_method "$round" "$i"; done
    fi
done

echo
status=0
"$BIN/python" -m benchmarks.serve_bench table "$OUT" --methods "$(IFS=,; echo "${NAMES[*]}")" ||
    status=1
for line in "${SKIPPED[@]}"; do
    echo "**$line**" | tee -a "$OUT/results.md"
done
exit "$status"
