#!/usr/bin/env bash
# Runs on the lent GPU, from the repository root, in three device calls made back to back (the
# machine keeps /tmp while it stays warm, 30 s after a call), each carrying one .kit/ part made
# by benchmarks/device/stage.sh:
#   bash benchmarks/device/gpu.sh install .kit/a     vLLM 0.26 kit, arctic-inference's suffix
#                                                    tree and this package; checks the hooks
#   bash benchmarks/device/gpu.sh stepcost .kit/a    the same, then step_cost.py on random
#                                                    weights in Qwen2.5-7B's shape into
#                                                    $OUT/step_cost.json (the first call's work)
#   bash benchmarks/device/gpu.sh stash .kit/b
#   bash benchmarks/device/gpu.sh bench .kit/c HARNESS-ARGS...   converts the model, runs the
#                                                 harness with --device cuda into $OUT/gpu
# `stepcost` alone, in one call carrying .kit/s (stage.sh --step-cost), measures the step cost
# without the harness.
set -euo pipefail
usage() {
    echo "usage: gpu.sh install|stepcost|stash|bench PART [harness args]" >&2
    exit 2
}
step=${1:-} part=${2:-}
[ -n "$step" ] && [ -n "$part" ] || usage
shift 2
STASH=/tmp/vllm-lookahead-stash
SITE=/tmp/site
mkdir -p "$STASH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export PYTHONPATH=$SITE:$PWD VLLM_LOOKAHEAD_CACHE=$STASH/cache
# The kit's vLLM is 0.26, the newest built for the device's torch; the plugin's gate names the
# versions it is tested on.
export VLLM_LOOKAHEAD_ALLOW_UNTESTED_VLLM=1
stash_slices() {  # the GGUF slices this call carries, kept while the machine stays warm
    if compgen -G "$part/gguf.xz.*" >/dev/null; then cp "$part"/gguf.xz.* "$STASH"/; fi
}
build_suffix_tree() {
    # vLLM's `suffix` imports arctic_inference.suffix_decoding, whose suffix tree is a nanobind
    # module; the device has cmake, ninja and nanobind but no index. Only that subpackage is
    # installed, without the distribution's metadata, so arctic-inference's own vLLM plugin
    # (an entry point) stays out of every engine.
    local src=/tmp/arctic-src
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$part"/arctic_inference-*.tar.gz -C "$src" --strip-components=1
    cmake -S "$src/csrc/suffix_decoding" -B "$src/build" -G Ninja \
        -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
    cmake --build "$src/build" -j 16 >/dev/null
    mkdir -p "$SITE/arctic_inference/suffix_decoding"
    cp "$src/arctic_inference/__init__.py" "$SITE/arctic_inference/"
    cp "$src"/arctic_inference/suffix_decoding/*.py "$src"/build/_C*.so \
        "$SITE/arctic_inference/suffix_decoding/"
    python3 -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
}
install() {
    [ -f "$SITE/.vllm-lookahead-installed" ] && return
    mkdir -p /tmp/vkit
    tar -xf "$part/part1.tar" -C /tmp/vkit
    bash /tmp/vkit/install.sh /tmp/vkit
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
    # The harness skips `suffix`, saying why, when this fails.
    build_suffix_tree || echo "gpu.sh: arctic-inference's suffix tree did not build" >&2
    python3 - <<'PY'
import importlib.metadata

plugins = [e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")]
assert "lookahead" in plugins, plugins
from vllm_lookahead import plugin, runner_hooks, vllm_boundary

plugin.register()
runner_hooks.install()
print("vllm-lookahead: plugin and hooks installed on vLLM", vllm_boundary.vllm_version())
PY
    touch "$SITE/.vllm-lookahead-installed"
}

case $step in
install)
    stash_slices
    install
    ;;
stash) stash_slices ;;
stepcost)
    stash_slices
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
