"""Lookahead parameters: names, defaults, validation. Knows nothing about vLLM.

Mapping to the reference implementation (LADE, Fu et al. 2024):

    ngram_size      N  LEVEL           n-gram length; a pool candidate has N-1 tokens
    window_size     W  WINDOW_SIZE     Jacobi guess positions that follow a full candidate
    guess_set_size  G  GUESS_SET_SIZE  continuations kept per pool key (LRU)
    pool_from_prompt   POOL_FROM_PROMPT seed the pool with the prompt's n-grams
    max_key_len        (new)           longest context used to look a candidate up
    seed               (new)           seeds the random prompt tokens that pad the window
    adaptive           (new)           cut chains where verifying a token no longer pays
    shared_pool_tokens (new)           finished requests' text kept to draft later requests
    memory_budget_mib  (new)           bytes the drafter may hold per engine, enforced by eviction

vLLM verifies one linear chain per request, so the chain for a step is the best pool candidate
(≤ N-1 tokens) followed by Jacobi guesses; K = num_speculative_tokens = N-1+W by default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

PARAMS_ENV = "VLLM_LOOKAHEAD_PARAMS"
"""Environment fallback carrying the parameters to processes that lost the config attribute."""

MAX_SPEC_LEN = 128
"""vLLM's rejection sampler asserts at most this many draft tokens per request."""

MAX_SHARED_TOKENS = 1 << 22
"""The most `shared_pool_tokens`: a namespace's text (what it retains, a quarter more before it is
rebuilt, and the sequence just added) must fit one compiled text index, which addresses
`context_index.MAX_TEXT` (2**24 - 1) tokens."""

LOSSLESS_REJECTION_METHOD = "standard"


class LookaheadConfigError(ValueError):
    """A lookahead setting is invalid; the message names the parameter, value and valid range."""


@dataclasses.dataclass(frozen=True)
class LookaheadConfig:
    ngram_size: int = 4
    window_size: int = 4
    guess_set_size: int = 8
    pool_from_prompt: bool = True
    max_key_len: int = 2
    seed: int = 0
    adaptive: bool | None = None
    """Cut each chain where the estimated probability of reaching and accepting the next token no
    longer pays for verifying it (online acceptance and step-cost models, over the whole batch).
    Off: every chain is K tokens, uniform, which keeps CUDA graphs whole. None: on where every
    verified token costs compute (CPU), off on GPUs."""
    shared_pool_tokens: int = 65536
    """Tokens of finished requests' outputs kept per engine for drafting later requests (the
    cross-request corpus); 0 turns sharing off."""
    memory_budget_mib: int = 1024
    """Bytes (in MiB) the engine's drafter may hold for all requests' text indexes, trajectory
    pools and the cross-request corpus; past it the drafter evicts (the corpus's oldest text,
    then the largest pools, then the largest text indexes)."""

    def __post_init__(self) -> None:
        _check_int("ngram_size", self.ngram_size, 2, 16)
        _check_int("window_size", self.window_size, 0, MAX_SPEC_LEN)
        _check_int("guess_set_size", self.guess_set_size, 1, 1024)
        _check_int("max_key_len", self.max_key_len, 1, 8)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("shared_pool_tokens", self.shared_pool_tokens, 0, MAX_SHARED_TOKENS,
                   why="the corpus's text, with its slack before a rebuild, stays within what "
                       "one text index addresses")
        _check_int("memory_budget_mib", self.memory_budget_mib, 1, 2**20)
        _check_bool("pool_from_prompt", self.pool_from_prompt)
        if self.adaptive is not None:
            _check_bool("adaptive", self.adaptive, "or null (auto)")

    @property
    def candidate_len(self) -> int:
        return self.ngram_size - 1

    @property
    def default_num_speculative_tokens(self) -> int:
        return self.candidate_len + self.window_size

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> LookaheadConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise LookaheadConfigError(
                f"unknown lookahead parameter {unknown[0]!r}; valid parameters: "
                f"{', '.join(sorted(known))}"
            )
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve_num_speculative_tokens(self, k: Any, *, window_given: bool) -> int:
        """The chain budget K: defaulted from N and W, or checked against them."""
        if k is None:
            k = self.default_num_speculative_tokens
        _check_int("num_speculative_tokens", k, self.candidate_len, MAX_SPEC_LEN,
                   why=f"it must hold a candidate of ngram_size-1 = {self.candidate_len} "
                       f"tokens and vLLM verifies at most {MAX_SPEC_LEN}")
        if window_given and k != self.default_num_speculative_tokens:
            raise LookaheadConfigError(
                f"num_speculative_tokens={k} contradicts ngram_size={self.ngram_size} and "
                f"window_size={self.window_size}: with both given it must equal "
                f"ngram_size-1+window_size = {self.default_num_speculative_tokens}; "
                "give only one of num_speculative_tokens and window_size"
            )
        return k

    def with_window_for(self, k: int) -> LookaheadConfig:
        """The same settings with W derived from K, so that the chain budget is exact."""
        return dataclasses.replace(self, window_size=k - self.candidate_len)


def _check_int(name: str, value: Any, lo: int, hi: int, why: str = "",
               what: str = "lookahead parameter") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LookaheadConfigError(
            f"{what} {name!r} must be an int in [{lo}, {hi}], got {value!r} "
            f"({type(value).__name__})"
        )
    if not lo <= value <= hi:
        reason = f" ({why})" if why else ""
        raise LookaheadConfigError(
            f"{what} {name!r}={value} is out of range: valid range is [{lo}, {hi}]{reason}"
        )


def _check_bool(name: str, value: Any, alternative: str = "",
                what: str = "lookahead parameter") -> None:
    if not isinstance(value, bool):
        alt = f" {alternative}" if alternative else ""
        raise LookaheadConfigError(
            f"{what} {name!r} must be a bool{alt}, got {value!r} ({type(value).__name__})"
        )


def params_from_env() -> dict[str, Any] | None:
    raw = os.environ.get(PARAMS_ENV)
    if not raw:
        return None
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LookaheadConfigError(f"{PARAMS_ENV} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise LookaheadConfigError(f"{PARAMS_ENV} must hold a JSON object, got {raw!r}")
    return params


PROPOSER_CLASS = "vllm_lookahead.proposer.LookaheadProposer"
METHOD = "lookahead"
_FLAT_PREFIX = "lookahead_"


def translate_speculative_config(
    user: Mapping[str, Any], vllm_fields: set[str]
) -> tuple[dict[str, Any], LookaheadConfig]:
    """Turn a user's `{"method": "lookahead", ...}` into vLLM's `custom_class` form.

    Lookahead parameters come nested (`"lookahead": {...}`) or flat (`"lookahead_<name>"`), so they
    never collide with SpeculativeConfig fields. `vllm_fields` are those fields; any other key is
    reported here, with a hint, rather than as a pydantic error deep inside vLLM.
    """
    spec = {k.replace("-", "_"): v for k, v in user.items()}
    params = _pop_lookahead_params(spec)
    for key in spec:
        if key not in vllm_fields:
            raise LookaheadConfigError(
                f"unknown key {key!r} in speculative_config; lookahead parameters go in "
                f"\"lookahead\": {{...}} or as \"lookahead_<name>\", with names "
                f"{', '.join(f.name for f in dataclasses.fields(LookaheadConfig))}"
            )
    method = spec.get("rejection_sample_method", LOSSLESS_REJECTION_METHOD)
    if method != LOSSLESS_REJECTION_METHOD:
        raise LookaheadConfigError(
            f"rejection_sample_method={method!r} is lossy; lookahead requires "
            f"{LOSSLESS_REJECTION_METHOD!r} so that outputs match decoding without speculation"
        )
    if spec.get("model") not in (None, PROPOSER_CLASS):
        raise LookaheadConfigError(
            f"speculative_config model={spec['model']!r}: lookahead uses no draft model; "
            "remove 'model'"
        )
    cfg = LookaheadConfig.from_dict(params)
    k = cfg.resolve_num_speculative_tokens(
        spec.get("num_speculative_tokens"), window_given="window_size" in params
    )
    spec.update(method="custom_class", model=PROPOSER_CLASS, num_speculative_tokens=k)
    return spec, cfg.with_window_for(k)


def _pop_lookahead_params(spec: dict[str, Any]) -> dict[str, Any]:
    nested = spec.pop(METHOD, None) or {}
    if not isinstance(nested, Mapping):
        raise LookaheadConfigError(
            f"speculative_config['lookahead'] must be an object of lookahead parameters, "
            f"got {nested!r}"
        )
    params = dict(nested)
    for key in [k for k in spec if k.startswith(_FLAT_PREFIX)]:
        name = key[len(_FLAT_PREFIX):]
        if name in params:
            raise LookaheadConfigError(
                f"lookahead parameter {name!r} is given twice (as {key!r} and inside 'lookahead')"
            )
        params[name] = spec.pop(key)
    return params


REQUEST_KEY = METHOD
"""The `SamplingParams.extra_args` key of a request's lookahead options."""

MAX_NAMESPACE_LEN = 256
_REQUEST = "lookahead request option"


@dataclasses.dataclass(frozen=True)
class RequestOptions:
    """One request's lookahead options, from `SamplingParams(extra_args={"lookahead": {...}})`.

    Over HTTP, `vllm_xargs` holds only strings, numbers and lists, and turns JSON booleans into
    integers, so the options also come flat (`"lookahead_enabled": 0`) or as a JSON string
    (`"lookahead": "{\\"enabled\\": false}"`), and 0/1 stand for false/true.
    """

    enabled: bool = True
    """False: no drafts for this request (plain decoding, one token per step)."""
    num_speculative_tokens: int | None = None
    """At most this many draft tokens per step for this request; 0 is the same as enabled=false.
    The front-end refuses values above the engine's K; the worker also clamps to K."""
    namespace: str | None = None
    """Requests share cross-request pool entries only within one namespace; None is the default
    namespace, shared by every request that names none."""
    share: bool = True
    """False: the request neither drafts from nor adds to the cross-request pool (it keeps its
    own per-request pool); a namespace then makes no sense and is refused."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "enabled", _flag("enabled", self.enabled))
        object.__setattr__(self, "share", _flag("share", self.share))
        if self.num_speculative_tokens is not None:
            _check_int("num_speculative_tokens", self.num_speculative_tokens, 0, MAX_SPEC_LEN,
                       what=_REQUEST)
        if self.namespace is not None:
            _check_namespace(self.namespace)
            if not self.share:
                raise LookaheadConfigError(
                    f"{_REQUEST}s 'namespace'={self.namespace!r} and 'share'=false contradict: "
                    "a request that does not share has no namespace; drop one of them")

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> RequestOptions:
        """The options in a request's `extra_args` (defaults if it has none)."""
        options = _request_options(extra_args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LookaheadConfigError(
                f"unknown {_REQUEST} {unknown[0]!r}; valid options: {', '.join(sorted(known))}")
        return cls(**options)

    def check_engine_budget(self, k: int) -> None:
        """Refuse a per-request budget above the engine's K (where K is known: the front-end)."""
        if self.num_speculative_tokens is not None:
            _check_int("num_speculative_tokens", self.num_speculative_tokens, 0, k,
                       why=f"the engine's num_speculative_tokens is {k}", what=_REQUEST)

    def chain_budget(self, k: int) -> int:
        """The most draft tokens per step for this request in an engine whose budget is K."""
        if not self.enabled:
            return 0
        if self.num_speculative_tokens is None:
            return k
        return min(k, self.num_speculative_tokens)


def _request_options(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    nested = extra_args.get(REQUEST_KEY)
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except json.JSONDecodeError as e:
            raise LookaheadConfigError(
                f"extra_args[{REQUEST_KEY!r}] is not valid JSON: {e}") from None
    if nested is None:
        nested = {}
    if not isinstance(nested, Mapping):
        raise LookaheadConfigError(
            f"extra_args[{REQUEST_KEY!r}] must be an object of lookahead request options (or a "
            f"JSON string of one), got {nested!r}")
    options = dict(nested)
    for key in [k for k in extra_args if k.startswith(_FLAT_PREFIX)]:
        name = key[len(_FLAT_PREFIX):]
        if name in options:
            raise LookaheadConfigError(
                f"{_REQUEST} {name!r} is given twice (as {key!r} and inside {REQUEST_KEY!r})")
        options[name] = extra_args[key]
    return options


def _flag(name: str, value: Any) -> bool:
    # vllm_xargs turns JSON true/false into 1/0, so those two integers stand for booleans here.
    if not isinstance(value, bool) and isinstance(value, int) and value in (0, 1):
        return bool(value)
    _check_bool(name, value, "(true/false, or 1/0)", what=_REQUEST)
    return value


def _check_namespace(value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAMESPACE_LEN:
        shown = f"{value[:40]!r}... ({len(value)} characters)" if isinstance(value, str) \
            and len(value) > 40 else repr(value)
        raise LookaheadConfigError(
            f"{_REQUEST} 'namespace' must be a string of 1 to {MAX_NAMESPACE_LEN} characters, "
            f"got {shown} ({type(value).__name__})")
