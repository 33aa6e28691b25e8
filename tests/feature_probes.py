"""Functions test_features.py runs inside vLLM's worker with `collective_rpc` (they need
VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the modules that use them set:
conftest.functions_to_workers). Kept import-light: the worker imports this module.

`start_chain_log` wraps the proposer so that every step records, per request, the chain it
proposed and how many drafts of the previous chain vLLM actually verified: what the scheduler cut
(a grammar's invalid drafts, the token budget) shows as proposed minus verified. For requests whose
prompt came as embeddings it also records what the drafter is shown at the prompt positions."""

from __future__ import annotations

from typing import Any


def start_chain_log(worker: Any) -> bool:
    proposer = worker.model_runner.drafter
    if getattr(proposer, "_chain_log", None) is None:
        original_propose = proposer.propose
        original_set = proposer.set_trajectory
        proposer._chain_log = []
        proposer._verified = {}

        def set_trajectory(trajectory: Any) -> None:
            verified: dict[str, int] = {}
            if trajectory is not None:
                for i, req_id in enumerate(trajectory.req_ids):
                    verified[req_id] = int(trajectory.cu_drafts[i + 1] - trajectory.cu_drafts[i])
            proposer._verified = verified
            original_set(trajectory)

        def propose(*args: Any, **kwargs: Any) -> list[list[int]]:
            verified = proposer._verified
            proposer._verified = {}
            drafts = original_propose(*args, **kwargs)
            runner = proposer._runner()
            for req_id, chain in zip(runner.input_batch.req_ids, drafts, strict=False):
                state = runner.requests.get(req_id)
                extra = getattr(getattr(state, "sampling_params", None), "extra_args", None)
                proposer._chain_log.append({
                    "req_id": req_id, "chain": [int(t) for t in chain],
                    "verified_before": verified.get(req_id),
                    "extra_args": extra,
                    "embeds": getattr(state, "prompt_token_ids", ()) is None})
            return drafts

        drafter = proposer.drafter
        original_draft_batch = drafter.draft_batch
        proposer._prompt_views = []

        def draft_batch(req_ids: Any, sampled: Any, num_tokens: Any, token_ids: Any,
                        *args: Any, **kwargs: Any) -> Any:
            # For prompts given as embeddings: what vLLM's buffer holds at the prompt positions,
            # what the drafter is shown there, and the mask it is given.
            runner = proposer._runner()
            requests = args[1] if len(args) > 1 else kwargs.get("requests")
            for row, req_id in enumerate(req_ids):
                state = runner.requests.get(req_id)
                if state is None or state.prompt_token_ids is not None:
                    continue
                n = state.num_prompt_tokens
                mask = requests.info(row, req_id).prompt_mask if requests is not None else None
                proposer._prompt_views.append({
                    "raw": sorted(set(runner.input_batch.token_ids_cpu[row, :n].tolist())),
                    "seen": sorted(set(token_ids[row, :n].tolist())),
                    "real_in_mask": None if mask is None else int(mask.sum())})
            return original_draft_batch(req_ids, sampled, num_tokens, token_ids, *args,
                                        **kwargs)

        drafter.draft_batch = draft_batch
        proposer.propose = propose  # vLLM calls self.drafter.propose(...)
        proposer.set_trajectory = set_trajectory  # the runner hook calls it on the proposer
    proposer._chain_log.clear()
    proposer._prompt_views.clear()
    return True


def take_chain_log(worker: Any) -> list[dict[str, Any]]:
    proposer = worker.model_runner.drafter
    log = list(proposer._chain_log)
    proposer._chain_log.clear()
    return log


def take_prompt_views(worker: Any) -> list[dict[str, Any]]:
    proposer = worker.model_runner.drafter
    views = list(proposer._prompt_views)
    proposer._prompt_views.clear()
    return views
