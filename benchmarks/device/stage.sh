#!/usr/bin/env bash
# Packs what a harness run on the lent GPU carries (see "On the lent GPU" in benchmarks/README.md).
# One device call carries at most 64 MiB, the repository's tracked files included; the vLLM kit
# is 40 MiB and SmolLM2's GGUF 86 MiB even xz-compressed, so they travel in three calls made back
# to back:
#   .kit/a  the kit (../shared/device/part1.tar), arctic-inference's source (vLLM's `suffix`
#           needs its suffix tree, which the kit lacks; gpu.sh builds it there), a config.json in
#           Qwen2.5-7B's shape for step_cost.py, and the first slice of the compressed GGUF
#   .kit/b  the middle slice
#   .kit/c  the last slice and a prompt cache slimmed to the files the readers use
# With --step-cost it packs .kit/s instead, for one call: the kit, arctic-inference's source
# and the config.json (random weights; see step_cost.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
KIT=${KIT:-../shared/device/part1.tar}
MODEL=${MODEL:-smollm2-135m}
SHAPE_CONFIG=${SHAPE_CONFIG:-../shared/device/examples/qwen7b-shape-config.json}
MIB=$((1 << 20))

common_part() {  # common_part DIR: what the first call needs besides the GGUF
    mkdir -p "$1/model"
    cp "$KIT" "$1/part1.tar"
    cp "$SHAPE_CONFIG" "$1/model/config.json"
    # The version installed here, as source: the device runs Python 3.12 and has no index.
    version=$($PY -c "import importlib.metadata as m; print(m.version('arctic-inference'))")
    $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$1" "arctic-inference==$version"
}

if [ "${1:-}" = --step-cost ]; then
    rm -rf .kit/s
    common_part .kit/s
    du -sh .kit/s
    exit
fi
# A call's 64 MiB with 1 MiB to spare, and what that leaves beside the repository's tracked files
# (one du over them all: xargs would split a long list into several totals).
BUDGET=$((63 * MIB))
repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
CALL=$((BUDGET - repo))

rm -rf .kit/a .kit/b .kit/c .kit/work
mkdir -p .kit/a .kit/b .kit/c .kit/work
common_part .kit/a
SLICE_A=$((CALL - $(du -sb .kit/a | cut -f1)))
SLICE_B=$CALL
gguf=$($PY -c "import sys; from pathlib import Path; from benchmarks.models import fetch_gguf
print(fetch_gguf(sys.argv[1], Path(sys.argv[2])))" "$MODEL" .kit/work)
xz -9 -T0 -c "$gguf" > .kit/work/gguf.xz
slice() {  # slice FROM_BYTE [BYTES] > FILE
    dd if=.kit/work/gguf.xz bs=1M iflag=skip_bytes,count_bytes status=none skip="$1" \
        ${2:+count="$2"}
}
slice 0 "$SLICE_A" > .kit/a/gguf.xz.0
slice "$SLICE_A" "$SLICE_B" > .kit/b/gguf.xz.1
slice $((SLICE_A + SLICE_B)) > .kit/c/gguf.xz.2
$PY -m benchmarks.datasets --slim-cache .kit/c/cache
rm -rf .kit/work
du -sh .kit/a .kit/b .kit/c
total=$((repo + $(du -sb .kit/c | cut -f1)))
[ "$total" -le "$BUDGET" ] || { echo "stage.sh: .kit/c and the repository: $total bytes" >&2; exit 1; }
