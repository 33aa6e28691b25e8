"""The methods a benchmark compares: vLLM's built-in speculative methods and lookahead at the
same K, lookahead grid points, and which of them cannot run on this machine."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import typing
from collections.abc import Mapping
from typing import Any

from benchmarks.labels import BASELINE, CONTROL
from vllm_lookahead.config import MAX_SPEC_LEN, LookaheadConfig, LookaheadConfigError

DEFAULT_K = 8
NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
SUFFIX_DEFAULT_DEPTH = 24
"""vLLM's suffix_decoding_max_tree_depth default, which an unset K becomes (0.32); the run asks
vLLM for its own value."""
SUFFIX_DEFAULT_ALIAS = "suffix-default"
SUFFIX_NO_GLOBAL_CACHE = {"suffix_decoding_max_cached_requests": 0}
LOOKAHEAD_SHARING = "shared_pool_tokens"
"""Lookahead's cross-request corpus, turned off (0) with --reuse-prompts where the plugin has it."""
DEFAULT_METHODS = f"{BASELINE},ngram,suffix,{SUFFIX_DEFAULT_ALIAS},lookahead,ngram_gpu"
GRID_KEYS = {"N": "ngram_size", "W": "window_size", "G": "guess_set_size", "A": "adaptive",
             "S": "shared_pool_tokens"}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    speculative_config: dict[str, Any] | None


def suffix_default_name(depth: int) -> str:
    return f"suffix[K={depth}]"


def builtin_methods(k: int = DEFAULT_K, suffix_depth: int = SUFFIX_DEFAULT_DEPTH,
                    reuse_prompts: bool = False) -> dict[str, dict[str, Any] | None]:
    """The built-in methods by name, all but suffix's default at K = k. With `reuse_prompts`
    (the old design: every concurrency replays the same prompts) suffix's global cache of earlier
    responses and lookahead's pool shared across requests are off, since they would recall the
    earlier answers verbatim."""
    suffix_extra = SUFFIX_NO_GLOBAL_CACHE if reuse_prompts else {}
    lookahead_extra = {"lookahead": lookahead_sharing_off()} if reuse_prompts else {}
    return {
        BASELINE: None,
        CONTROL: None,
        "ngram": {"method": "ngram", "num_speculative_tokens": k, **NGRAM_LOOKUP},
        "suffix": {"method": "suffix", "num_speculative_tokens": k, **suffix_extra},
        # No K: vLLM sets it to suffix_decoding_max_tree_depth.
        suffix_default_name(suffix_depth): {"method": "suffix", **suffix_extra},
        "lookahead": {"method": "lookahead", "num_speculative_tokens": k, **lookahead_extra},
        "ngram_gpu": {"method": "ngram_gpu", "num_speculative_tokens": k, **NGRAM_LOOKUP},
    }


def lookahead_sharing_off() -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(LookaheadConfig)}
    return {LOOKAHEAD_SHARING: 0} if LOOKAHEAD_SHARING in fields else {}


def parse_grid(spec: str, k: int | None = None, reuse_prompts: bool = False) -> list[Method]:
    """`"N=3,W=4;N=5,W=8,G=16"` -> lookahead methods; K sets num_speculative_tokens, and a point
    that gives neither K nor W gets K = `k`. Each point is validated here, so that a bad one
    fails before any engine has run."""
    return [_grid_point(p.strip(), k, reuse_prompts) for p in spec.split(";") if p.strip()]


def _grid_point(point: str, k: int | None, reuse_prompts: bool) -> Method:
    values: dict[str, int] = {}
    for item in point.split(","):
        key, _, value = item.partition("=")
        key = key.strip().upper()
        if key not in (*GRID_KEYS, "K") or not value.strip().isdigit():
            raise SystemExit(f"--lookahead-grid: bad {item!r} in {point!r}; use N (ngram_size), "
                             "W (window_size), G (guess_set_size), A (adaptive, 0 or 1), "
                             "S (shared_pool_tokens) or K, each =<integer>")
        values[key] = int(value)
    params: dict[str, Any] = {GRID_KEYS[k]: v for k, v in values.items() if k in GRID_KEYS}
    if "adaptive" in params:
        params["adaptive"] = bool(params["adaptive"])
    budget = values.get("K", k if "W" not in values else None)
    try:
        LookaheadConfig.from_dict(params).resolve_num_speculative_tokens(
            budget, window_given="window_size" in params)
    except LookaheadConfigError as e:
        raise SystemExit(f"--lookahead-grid {point!r}: {e}") from None
    extra = lookahead_sharing_off() if reuse_prompts else {}
    config: dict[str, Any] = {"method": "lookahead", "lookahead": {**params, **extra}}
    if budget is not None:
        config["num_speculative_tokens"] = budget
    name = ",".join(f"{k}={v}" for k, v in values.items())
    return Method(f"lookahead[{name}]", config)


def select_methods(names: str, grid: str, k: int = DEFAULT_K, *,
                   suffix_depth: int = SUFFIX_DEFAULT_DEPTH,
                   unavailable: Mapping[str, str] | None = None,
                   reuse_prompts: bool = False) -> tuple[list[Method], dict[str, str]]:
    """The methods to run (the baseline first, always) and those that will not run, with why.
    `unavailable` says why a built-in method cannot run here (see `unavailable_methods`)."""
    if not 1 <= k <= MAX_SPEC_LEN:
        raise SystemExit(f"--k {k}: must be in [1, {MAX_SPEC_LEN}]")
    builtins = builtin_methods(k, suffix_depth, reuse_prompts)
    default_suffix = suffix_default_name(suffix_depth)
    chosen = chosen_names(names, builtins, suffix_depth, "--methods")
    if "lookahead" in chosen:
        try:
            LookaheadConfig().resolve_num_speculative_tokens(k, window_given=False)
        except LookaheadConfigError as e:
            raise SystemExit(f"--k {k}: {e}") from None
    skipped = {n: why for n, why in (unavailable or {}).items() if n in chosen}
    if default_suffix in chosen and "suffix" in chosen and k == suffix_depth:
        skipped[default_suffix] = f"the same as `suffix` at --k {k}"
    ordered = [BASELINE, *(n for n in chosen if n != BASELINE and n not in skipped)]
    methods = [Method(n, builtins[n]) for n in ordered]
    return methods + parse_grid(grid, k, reuse_prompts), skipped


def chosen_names(names: str, builtins: Mapping[str, Any], suffix_depth: int,
                 option: str) -> list[str]:
    """The comma-separated method names, each once in the order given, `SUFFIX_DEFAULT_ALIAS`
    resolved; an unknown name stops the run, naming `option`."""
    default_suffix = suffix_default_name(suffix_depth)
    aliases = {SUFFIX_DEFAULT_ALIAS: default_suffix}
    chosen = list(dict.fromkeys(aliases.get(n.strip(), n.strip())
                                for n in names.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in builtins]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; known: {', '.join(builtins)} "
                         f"({SUFFIX_DEFAULT_ALIAS} = {default_suffix})")
    return chosen


def unavailable_methods(device: str) -> dict[str, str]:
    """Why built-in methods cannot run here. It asks vLLM, so call it after
    `benchmarks.engine.configure_env`."""
    why: dict[str, str] = {}
    if suffix := _suffix_unavailable():
        why["suffix"] = why[suffix_default_name(vllm_suffix_depth())] = suffix
    if device != "cuda":
        why["ngram_gpu"] = "vLLM runs it on CUDA only: needs --device cuda"
    elif not _vllm_has_method("ngram_gpu"):
        import vllm

        why["ngram_gpu"] = f"vLLM {vllm.__version__} has no method 'ngram_gpu'"
    return why


def _suffix_unavailable() -> str | None:
    """Why vLLM's suffix method cannot run here: it needs the arctic-inference package."""
    try:
        importlib.import_module("arctic_inference.suffix_decoding")
    except ImportError as e:
        # Either not installed, or installed with a native extension or dependency that fails.
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("arctic")
        return "arctic-inference not installed" if missing else f"arctic-inference: {e}"
    return None


@functools.cache
def vllm_suffix_depth() -> int:
    """What vLLM makes of suffix's unset num_speculative_tokens: its default tree depth."""
    try:
        from vllm.config.speculative import SpeculativeConfig

        fields = {f.name: f.default for f in dataclasses.fields(SpeculativeConfig)}
        depth = fields.get("suffix_decoding_max_tree_depth")
    except (ImportError, TypeError):
        return SUFFIX_DEFAULT_DEPTH
    return depth if isinstance(depth, int) else SUFFIX_DEFAULT_DEPTH


def _vllm_has_method(name: str) -> bool:
    try:
        from vllm.config.speculative import SpeculativeMethod
    except ImportError:
        return False

    def literals(tp: Any) -> set[Any]:
        args = typing.get_args(tp)
        return {x for a in args for x in (literals(a) if typing.get_args(a) else {a})}

    return name in literals(SpeculativeMethod)
