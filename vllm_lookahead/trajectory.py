"""What the engine tells the drafter: per request, what it is (`RequestInfo`, looked up through a
`RequestSource`), and per verification step, the chain that was verified and the target's greedy
prediction at every chain position (including those after the first rejection). No numba here: the
vLLM-facing layer imports this module before vLLM has set up its workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from vllm_lookahead.config import RequestOptions


@dataclasses.dataclass
class StepTrajectory:
    """Arrays of any integer dtype; int64 ones reach the drafter's kernel without a copy."""

    req_ids: list[str]
    bases: np.ndarray
    """Committed tokens of each row before the step (the token index of its first draft)."""
    cu_drafts: np.ndarray
    """Row i's drafts and predictions are `drafts[cu[i]:cu[i+1]]`, `argmax[cu[i]:cu[i+1]]`."""
    resolve: Callable[[], tuple[np.ndarray, np.ndarray]]
    """Returns the flat `(drafts, argmax)`; on CUDA it waits for the non-blocking copies, so it is
    called only when `propose` first needs them."""
    _arrays: tuple[np.ndarray, np.ndarray] | None = None
    _rows: dict[str, int] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat `(drafts, argmax)`, resolved once."""
        if self._arrays is None:
            self._arrays = self.resolve()
        return self._arrays

    def row(self, req_id: str) -> tuple[int, np.ndarray, np.ndarray] | None:
        """`(base, drafts, argmax)` of a request, or None if it had no drafts this step."""
        if self._rows is None:
            self._rows = {rid: i for i, rid in enumerate(self.req_ids)}
        i = self._rows.get(req_id)
        if i is None:
            return None
        lo, hi = int(self.cu_drafts[i]), int(self.cu_drafts[i + 1])
        if lo == hi:
            return None
        drafts, argmax = self.arrays()
        return int(self.bases[i]), drafts[lo:hi], argmax[lo:hi]


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    owner: object
    """vLLM's state object for the request; another object under the same id is a new request."""
    num_prompt_tokens: int
    stop_token_ids: frozenset[int]
    options: RequestOptions = dataclasses.field(default_factory=RequestOptions)
    """The request's lookahead options (`extra_args`), validated in the front-end."""
    greedy: bool = True
    """Decoded greedily; sampled requests accept less, so their acceptance is learned apart."""
    prompt_mask: np.ndarray | None = None
    """True where a prompt position holds a real token id (False for positions filled from
    `prompt_embeds` or multimodal placeholders); None: every position does."""
    max_new_tokens: int | None = None
    """The most tokens the request may generate (vLLM's `max_tokens`); None: unknown."""
    seeded: bool = False
    """The request samples with its own `seed`: its drafts then depend on its own tokens and the
    engine's configuration only (no shared corpus, no learned acceptance, no batch-wide cut), so
    that it draws the same random numbers, and gets the same tokens, from run to run."""
    stops_masked_until: int = 0
    """The committed length (prompt and output) below which vLLM masks the stop tokens (the
    prompt plus `min_tokens`); 0: no such mask."""


def stops_masked_until(num_prompt_tokens: int, min_tokens: int,
                       stop_token_ids: frozenset[int]) -> int:
    """`RequestInfo.stops_masked_until` of a request with vLLM's `min_tokens`."""
    return num_prompt_tokens + min_tokens if min_tokens and stop_token_ids else 0


class RequestSource(Protocol):
    reports_removals: bool
    """Whether the drafter's `remove` is called for every request the engine drops, before
    another request may take its id: then a known id is the same request, and the drafter need not
    ask for its owner every step."""

    def owner(self, req_id: str) -> object | None: ...

    def info(self, row: int, req_id: str) -> RequestInfo: ...

    def prefilled(self, req_id: str) -> int:
        """Tokens of the request that the engine had computed before this step (its prefill's
        progress)."""
        ...


class Requests:
    """A `RequestSource` kept by hand, without vLLM: the simulated engine's live requests, and the
    drafter's warm-up request."""

    def __init__(self, reports_removals: bool = False) -> None:
        self.reports_removals = reports_removals
        self._infos: dict[str, RequestInfo] = {}
        self.computed: dict[str, int] = {}
        """Tokens computed before this step, of requests still in their prefill."""

    def add(self, rid: str, prompt_len: int, options: RequestOptions | None = None,
            prompt_mask: Sequence[bool] | None = None, greedy: bool = True,
            stop_token_ids: frozenset[int] = frozenset(),
            max_new_tokens: int | None = None, seeded: bool = False,
            min_tokens: int = 0) -> None:
        mask = None if prompt_mask is None else np.array(prompt_mask, dtype=bool)
        self._infos[rid] = RequestInfo(
            owner=object(), num_prompt_tokens=prompt_len, stop_token_ids=stop_token_ids,
            options=options or RequestOptions(), greedy=greedy, prompt_mask=mask,
            max_new_tokens=max_new_tokens, seeded=seeded,
            stops_masked_until=stops_masked_until(prompt_len, min_tokens, stop_token_ids))

    def remove(self, rid: str) -> None:
        del self._infos[rid]
        self.computed.pop(rid, None)

    def owner(self, rid: str) -> object | None:
        info = self._infos.get(rid)
        return None if info is None else info.owner

    def info(self, row: int, rid: str) -> RequestInfo:
        return self._infos[rid]

    def prefilled(self, rid: str) -> int:
        return self.computed.get(rid, 0)
