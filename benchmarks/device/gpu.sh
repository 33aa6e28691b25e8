#!/usr/bin/env bash
# Runs on the lent GPU, from the repository root, in three device calls made back to back (the
# machine keeps /tmp while it stays warm, 30 s after a call), each carrying one .kit/ part made
# by benchmarks/device/stage.sh:
#   bash benchmarks/device/gpu.sh install .kit/a   vLLM 0.26 kit + this package; checks the hooks
#   bash benchmarks/device/gpu.sh stash .kit/b
#   bash benchmarks/device/gpu.sh bench .kit/c HARNESS-ARGS...   converts the model, runs the
#                                                 harness with --device cuda into $OUT/gpu
# or, in one call carrying .kit/s (stage.sh --step-cost): the kit, then step_cost.py on random
# weights in Qwen2.5-7B's shape into $OUT/step_cost.json
#   bash benchmarks/device/gpu.sh stepcost .kit/s
set -euo pipefail
usage() {
    echo "usage: gpu.sh install|stash|bench|stepcost PART [harness args]" >&2
    exit 2
}
step=${1:-} part=${2:-}
[ -n "$step" ] && [ -n "$part" ] || usage
shift 2
STASH=/tmp/vllm-lookahead-stash
mkdir -p "$STASH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export PYTHONPATH=/tmp/site:$PWD VLLM_LOOKAHEAD_CACHE=$STASH/cache
# The kit's vLLM is 0.26, the newest built for the device's torch; the plugin's gate names the
# versions it is tested on.
export VLLM_LOOKAHEAD_ALLOW_UNTESTED_VLLM=1
stash_slices() {  # the GGUF slices this call carries, kept while the machine stays warm
    cp "$part"/gguf.xz.* "$STASH"/
}
install() {
    mkdir -p /tmp/vkit
    tar -xf "$part/part1.tar" -C /tmp/vkit
    bash /tmp/vkit/install.sh /tmp/vkit
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    python3 - <<'PY'
import importlib.metadata

plugins = [e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")]
assert "lookahead" in plugins, plugins
from vllm_lookahead import plugin, vllm_compat

plugin.register()
vllm_compat.install_runner_hooks()
print("vllm-lookahead: plugin and hooks installed on vLLM", vllm_compat.vllm_version())
PY
}

case $step in
install)
    stash_slices
    install
    ;;
stash) stash_slices ;;
stepcost)
    install
    python3 -m benchmarks.device.step_cost "$part/model" "$OUT/step_cost.json"
    ;;
bench)
    stash_slices
    mkdir -p "$STASH/cache"
    cp -r "$part"/cache/. "$STASH/cache/"
    cat "$STASH"/gguf.xz.* | python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)' > "$STASH/model.gguf"
    python3 -m benchmarks.models "${MODEL:-smollm2-135m}" --gguf "$STASH/model.gguf"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -m benchmarks.run --model "${MODEL:-smollm2-135m}" --device cuda --out "$OUT/gpu" "$@"
    ;;
*) usage ;;
esac
