"""The version gate and the hooks' idempotence (vLLM is imported, no engine is started)."""

import pytest

from vllm_lookahead import vllm_compat


def test_supported_version_passes():
    assert vllm_compat.check_vllm_version().startswith(vllm_compat.SUPPORTED_VLLM)


def test_other_versions_are_refused_with_a_way_out(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    monkeypatch.delenv(vllm_compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(vllm_compat.UnsupportedVLLMError,
                       match=r"supports vLLM 0.32 and 0.33 \(found 0.31.2\).*"
                             + vllm_compat.ALLOW_UNTESTED_ENV):
        vllm_compat.check_vllm_version()
    monkeypatch.setenv(vllm_compat.ALLOW_UNTESTED_ENV, "1")
    assert vllm_compat.check_vllm_version() == "0.31.2"


def test_hooks_install_once():
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    vllm_compat.install_runner_hooks()
    sample, removed = GPUModelRunner._sample, GPUModelRunner._on_request_state_removed
    tap = rejection_sampler._rejection_greedy_sample
    vllm_compat.install_runner_hooks()
    assert GPUModelRunner._sample is sample
    assert GPUModelRunner._on_request_state_removed is removed
    assert rejection_sampler._rejection_greedy_sample is tap
    assert isinstance(tap, vllm_compat._GreedyArgmaxTap)
    # one layer of wrapping, over vLLM's own function
    assert not getattr(sample.__wrapped__, "_vllm_lookahead_hook", False)
    # the tap forwards what vLLM's warm-up registration needs
    assert tap.register_warmup == tap._inner.register_warmup


def test_requests_report_removals_only_through_the_installed_hook():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    vllm_compat.install_runner_hooks()

    class Plain:
        def _on_request_state_removed(self, req_id, req_state):
            pass

    class Subclass(GPUModelRunner):  # vLLM's CPU runner inherits the hooked method
        pass

    # The drafter skips its per-row owner check only where every removal reaches it.
    assert vllm_compat.RunnerRequests(object.__new__(Subclass)).reports_removals
    assert not vllm_compat.RunnerRequests(Plain()).reports_removals
    assert not vllm_compat.RunnerRequests(object()).reports_removals


def test_capture_computes_the_argmax_itself_where_vllm_has_no_greedy_dispatcher(monkeypatch):
    """vLLM 0.26 computes the greedy argmax inline, so there is nothing to tap."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm.v1.sample import rejection_sampler

    monkeypatch.delattr(rejection_sampler, "_rejection_greedy_sample")
    vllm_compat.install_runner_hooks()
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    meta = SimpleNamespace(num_draft_tokens=[2], target_logits_indices=torch.tensor([0, 1]),
                           draft_token_ids=torch.tensor([1, 2]))
    batch = SimpleNamespace(req_ids=["r"], num_tokens_no_spec=np.array([7]),
                            sampling_metadata=SimpleNamespace(all_random=False))
    trajectory = vllm_compat._Capture(SimpleNamespace(input_batch=batch), logits, meta).finish()
    base, drafts, argmax = trajectory.row("r")
    assert base == 7
    assert drafts.tolist() == [1, 2]
    assert argmax.tolist() == [1, 0]


def test_the_front_end_and_the_hooks_do_not_import_numba():
    """vLLM 0.32's CPU kernel dispatcher scans every loaded module when a worker starts and
    crashes on llvmlite's library wrapper (`'_lib_fn_wrapper' object has no attribute 'get'`).
    The plugin's entry point and the modules the front-end loads must therefore leave numba
    unloaded until the proposer itself is built, after the worker has registered its kernels."""
    import subprocess
    import sys

    code = ("import sys, vllm_lookahead, vllm_lookahead.plugin, vllm_lookahead.vllm_compat, "
            "vllm_lookahead.metrics; vllm_lookahead.register(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_llvmlites_library_wrapper_survives_vllms_module_scan():
    """vLLM's kernel-override scan calls vars(value).get(...) on every module attribute with a
    __dict__; llvmlite's wrapper must not claim one, and must still resolve its symbols."""
    from llvmlite.binding import ffi

    vllm_compat.make_llvmlite_scan_safe()
    vllm_compat.make_llvmlite_scan_safe()  # idempotent
    assert not hasattr(ffi.lib, "__dict__")
    assert callable(ffi.lib.LLVMPY_GetVersionInfo)
