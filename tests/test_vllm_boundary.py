"""The declared vLLM boundary: the version gate, every declared target checked on the installed
vLLM, nothing patched on a mismatch, arguments passed through untouched off the lookahead path,
and the hooks' idempotence (vLLM is imported, no engine is started)."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from vllm_lookahead import engine_requests, runner_hooks, vllm_boundary
from vllm_lookahead.vllm_boundary import Side


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=False)


def test_every_declared_target_matches_the_tested_vllm():
    assert vllm_boundary.problems(Side.FRONT_END) == []
    assert vllm_boundary.problems(Side.WORKER) == []
    assert vllm_boundary.require(Side.WORKER) == []


def test_each_declaration_says_why_and_what_a_mismatch_does():
    targets = [t.target for t in vllm_boundary.TOUCHPOINTS]
    assert len(targets) == len(set(targets))
    for touchpoint in vllm_boundary.TOUCHPOINTS:
        assert touchpoint.why and touchpoint.on_mismatch and touchpoint.checked_on
        assert touchpoint.parameters or touchpoint.fields or touchpoint.action in (
            vllm_boundary.Action.READS, vllm_boundary.Action.WRITES)


def test_a_changed_signature_or_a_missing_field_is_reported():
    changed = vllm_boundary.Touchpoint(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample", vllm_boundary.Action.WRAPS,
        Side.WORKER, "why", "what", parameters=("self", "logits", "metadata"))
    assert "lacks the parameters" in vllm_boundary.problem(changed)
    missing = vllm_boundary.Touchpoint(
        "vllm.v1.worker.gpu_input_batch.CachedRequestState", vllm_boundary.Action.READS,
        Side.WORKER, "why", "what", fields=("prompt_token_ids", "renamed_field"))
    assert vllm_boundary.problem(missing).endswith("has no renamed_field")
    gone = vllm_boundary.Touchpoint("vllm.v1.worker.no_such_module.Runner._sample",
                                    vllm_boundary.Action.WRAPS, Side.WORKER, "why", "what")
    assert "not found" in vllm_boundary.problem(gone)


def test_supported_version_passes_and_others_are_refused_with_a_way_out(monkeypatch):
    import vllm

    assert vllm_boundary.version_problem() is None
    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    monkeypatch.delenv(vllm_boundary.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(vllm_boundary.UnsupportedVLLMError,
                       match=r"cannot run on vLLM 0.31.2: it supports vLLM 0.32 and 0.33.*"
                             + vllm_boundary.ALLOW_UNTESTED_ENV):
        vllm_boundary.require(Side.FRONT_END)
    monkeypatch.setenv(vllm_boundary.ALLOW_UNTESTED_ENV, "1")
    assert vllm_boundary.version_problem() is None


def test_a_worker_mismatch_patches_nothing_and_names_the_target():
    out = run_python("""
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm_lookahead import runner_hooks, vllm_boundary
        GPUModelRunner._sample = lambda self, sampler_output: None
        try:
            runner_hooks.install()
        except vllm_boundary.UnsupportedVLLMError as e:
            print("REFUSED", e)
        print("REMOVED_HOOKED",
              getattr(GPUModelRunner._on_request_state_removed, vllm_boundary.MARK, False))
    """)
    assert "REFUSED vllm-lookahead cannot run on vLLM" in out.stdout, out.stderr
    assert "GPUModelRunner._sample" in out.stdout
    assert "REMOVED_HOOKED False" in out.stdout


def test_a_front_end_mismatch_leaves_other_methods_untouched_and_refuses_lookahead():
    out = run_python("""
        import logging
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm_lookahead import plugin, vllm_boundary
        InputProcessor._validate_params = lambda self, request: None
        original_cli = EngineArgs.add_cli_args
        plugin.register()
        print("CLI_UNTOUCHED", EngineArgs.add_cli_args is original_cli)
        args = EngineArgs(model="m", speculative_config={"method": "lookahead"})
        try:
            EngineArgs.create_speculative_config(args, None, None)
        except vllm_boundary.UnsupportedVLLMError as e:
            print("REFUSED", e)
    """)
    assert "CLI_UNTOUCHED True" in out.stdout, out.stderr
    assert "REFUSED vllm-lookahead cannot run on vLLM" in out.stdout, out.stderr
    assert "_validate_params" in out.stdout
    assert out.stderr.count("engines without lookahead are not affected") == 1


def test_the_refusal_passes_every_other_method_through():
    from vllm_lookahead import plugin

    calls = []

    def original(engine_args, *args, **kwargs):
        calls.append((engine_args, args, kwargs))
        return "spec"

    refusal = plugin._refusing(original, "why not")
    ngram = SimpleNamespace(speculative_config={"method": "ngram"}, spec_method=None)
    assert refusal(ngram, "model", target_parallel_config="parallel") == "spec"
    assert calls == [(ngram, ("model",), {"target_parallel_config": "parallel"})]
    with pytest.raises(vllm_boundary.UnsupportedVLLMError, match="why not"):
        refusal(SimpleNamespace(speculative_config=None, spec_method="lookahead"), "m", "p")


def test_hooks_pass_every_argument_through_off_the_lookahead_path():
    calls = []

    def original(runner, *args, **kwargs):
        calls.append((runner, args, kwargs))
        return "result"

    runner = SimpleNamespace(drafter=None)
    sample = runner_hooks._sample_hook(original)
    assert sample(runner, "logits", spec_decode_metadata="meta") == "result"
    assert sample(runner, "logits", "meta", "extra", flag=True) == "result"
    removed = runner_hooks._removed_hook(original)
    assert removed(runner, "req", req_state="state") == "result"
    assert calls == [(runner, ("logits",), {"spec_decode_metadata": "meta"}),
                     (runner, ("logits", "meta", "extra"), {"flag": True}),
                     (runner, ("req",), {"req_state": "state"})]


def test_hooks_install_once():
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner_hooks.install()
    sample, removed = GPUModelRunner._sample, GPUModelRunner._on_request_state_removed
    tap = rejection_sampler._rejection_greedy_sample
    runner_hooks.install()
    assert GPUModelRunner._sample is sample
    assert GPUModelRunner._on_request_state_removed is removed
    assert rejection_sampler._rejection_greedy_sample is tap
    assert isinstance(tap, runner_hooks._GreedyArgmaxTap)
    # one layer of wrapping, over vLLM's own function
    assert not getattr(sample.__wrapped__, vllm_boundary.MARK, False)
    # the tap forwards what vLLM's warm-up registration needs
    assert tap.register_warmup == tap._inner.register_warmup


def test_requests_report_removals_only_through_the_installed_hook():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner_hooks.install()

    class Plain:
        def _on_request_state_removed(self, req_id, req_state):
            pass

    class Subclass(GPUModelRunner):  # vLLM's CPU runner inherits the hooked method
        pass

    # The drafter skips its per-row owner check only where every removal reaches it.
    assert engine_requests.RunnerRequests(object.__new__(Subclass)).reports_removals
    assert not engine_requests.RunnerRequests(Plain()).reports_removals
    assert not engine_requests.RunnerRequests(object()).reports_removals


def test_capture_computes_the_argmax_itself_where_vllm_has_no_greedy_dispatcher(monkeypatch):
    """vLLM 0.26 computes the greedy argmax inline, so there is nothing to tap."""
    import numpy as np
    import torch

    monkeypatch.setattr(runner_hooks, "_greedy_tap_installed", lambda: False)
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    meta = SimpleNamespace(num_draft_tokens=[2], target_logits_indices=torch.tensor([0, 1]),
                           draft_token_ids=torch.tensor([1, 2]))
    batch = SimpleNamespace(req_ids=["r"], num_tokens_no_spec=np.array([7]),
                            sampling_metadata=SimpleNamespace(all_random=False))
    trajectory = runner_hooks._Capture(SimpleNamespace(input_batch=batch), logits, meta).finish()
    base, drafts, argmax = trajectory.row("r")
    assert base == 7
    assert drafts.tolist() == [1, 2]
    assert argmax.tolist() == [1, 0]


def test_the_runtime_attributes_are_checked_before_they_are_read():
    vllm_boundary.check_attributes("InputBatch", SimpleNamespace(
        req_ids=[], num_tokens_no_spec=None, num_prompt_tokens=None, token_ids_cpu=None,
        sampling_metadata=None))
    with pytest.raises(vllm_boundary.UnsupportedVLLMError, match="InputBatch has no req_ids"):
        vllm_boundary.check_attributes("InputBatch", SimpleNamespace(
            num_tokens_no_spec=None, num_prompt_tokens=None, token_ids_cpu=None,
            sampling_metadata=None))


def test_the_front_end_and_the_hooks_do_not_import_numba():
    """vLLM 0.32's CPU kernel dispatcher scans every loaded module when a worker starts and
    crashes on llvmlite's library wrapper (`'_lib_fn_wrapper' object has no attribute 'get'`).
    The plugin's entry point and the modules the front-end loads must therefore leave numba
    unloaded until the proposer itself is built, after the worker has registered its kernels."""
    out = run_python(
        "import sys, vllm_lookahead, vllm_lookahead.plugin, vllm_lookahead.runner_hooks, "
        "vllm_lookahead.engine_requests, vllm_lookahead.metrics; vllm_lookahead.register(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_llvmlites_library_wrapper_survives_vllms_module_scan():
    """vLLM's kernel-override scan calls vars(value).get(...) on every module attribute with a
    __dict__; llvmlite's wrapper must not claim one, and must still resolve its symbols."""
    from llvmlite.binding import ffi

    from vllm_lookahead import cpu_workarounds

    cpu_workarounds.make_llvmlite_scan_safe()
    cpu_workarounds.make_llvmlite_scan_safe()  # idempotent
    assert not hasattr(ffi.lib, "__dict__")
    assert callable(ffi.lib.LLVMPY_GetVersionInfo)
