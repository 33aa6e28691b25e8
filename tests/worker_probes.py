"""Functions the tests run inside vLLM's workers with `collective_rpc` (they need
VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the modules that use them set:
conftest.functions_to_workers). Kept import-light: every worker that runs one imports this
module."""

from __future__ import annotations

import hashlib
from typing import Any


def record_drafts(worker: Any) -> bool:
    """From now on, fold every chain this worker's proposer returns into a running digest."""
    drafter = worker.model_runner.drafter
    if getattr(drafter, "_test_digest", None) is None:
        original = drafter.propose
        drafter._test_digest = hashlib.sha256()
        drafter._test_calls = 0

        def propose(*args: Any, **kwargs: Any) -> list[list[int]]:
            drafts = original(*args, **kwargs)
            drafter._test_digest.update(repr([list(map(int, d)) for d in drafts]).encode())
            drafter._test_calls += 1
            return drafts

        drafter.propose = propose  # vLLM calls self.drafter.propose(...)
    return True


def drafts_digest(worker: Any) -> dict[str, Any]:
    """This worker's TP rank, how many times it proposed since record_drafts, and the digest."""
    from vllm.distributed import get_tensor_model_parallel_rank

    drafter = worker.model_runner.drafter
    return {"rank": get_tensor_model_parallel_rank(), "calls": drafter._test_calls,
            "digest": drafter._test_digest.hexdigest()}
