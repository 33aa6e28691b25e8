#!/usr/bin/env bash
# Packs what a harness run on the lent GPU carries (see "On the lent GPU" in benchmarks/README.md).
# One device call carries at most 64 MiB; the vLLM kit is 40 MiB and SmolLM2's GGUF 86 MiB even
# xz-compressed, so they travel in three calls made back to back:
#   .kit/a  the kit (../shared/device/part1.tar) and the first slice of the compressed GGUF
#   .kit/b  the middle slice
#   .kit/c  the last slice and a prompt cache slimmed to the files the readers use
# With --step-cost it packs .kit/s instead, for one call: the kit and a config.json in
# Qwen2.5-7B's shape (random weights; see step_cost.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
KIT=${KIT:-../shared/device/part1.tar}
MODEL=${MODEL:-smollm2-135m}
if [ "${1:-}" = --step-cost ]; then
    rm -rf .kit/s
    mkdir -p .kit/s/model
    cp "$KIT" .kit/s/part1.tar
    cp "${SHAPE_CONFIG:-../shared/device/examples/qwen7b-shape-config.json}" .kit/s/model/config.json
    du -sh .kit/s
    exit
fi
MIB=$((1 << 20))
# What is left of a call's 64 MiB for GGUF bytes, once the kit and the repository itself travel.
SLICE_A=$(((60 * MIB - $(stat -c %s "$KIT"))))
SLICE_B=$((62 * MIB))

rm -rf .kit/a .kit/b .kit/c .kit/work
mkdir -p .kit/a .kit/b .kit/c .kit/work
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
cp "$KIT" .kit/a/part1.tar
$PY -m benchmarks.datasets --slim-cache .kit/c/cache
rm -rf .kit/work
du -sh .kit/a .kit/b .kit/c
