"""Mutation check: plant one deliberate fault at a time and show that the test suite catches it.

Each `Fault` replaces one exact piece of source (which must occur exactly once) in a scratch copy
of the checkout, then runs the tests that guard that area with `pytest -x`; the fault is caught if
a test fails, and the script reports which test and after how long. A fault nobody catches is a
missing test. The scratch copy keeps the checkout's compiled-kernel cache, so a fault outside the
kernels costs no recompilation (one inside them recompiles, about half a minute).

    .venv/bin/python scripts/mutation_check.py             # every fault, a markdown table
    .venv/bin/python scripts/mutation_check.py --only cut  # the faults whose name contains "cut"
    .venv/bin/python scripts/mutation_check.py --list      # the faults, nothing run

Exit status 1 if any fault survives or a fault's source text is not found (the code moved: update
the fault). Not part of CI: a full run takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = "not engine and not ray and not slow"


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    area: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    """The tests that guard the area (pytest arguments)."""
    marks: str = FAST


FAULTS = (
    Fault("compose picks the worst bid", "chain composition", "vllm_lookahead/chain.py",
          "if best < 0 or p > best_p:", "if best < 0 or p < best_p:",
          ("tests/test_compiled_drafter.py", "tests/test_drafter.py")),
    Fault("cut counts a kept token as certain", "the cost cut", "vllm_lookahead/chain.py",
          "        expected += q\n", "        expected += 1.0\n",
          ("tests/test_compiled_drafter.py", "tests/test_drafter.py")),
    Fault("acceptance counts the rejected token as accepted", "the acceptance update",
          "vllm_lookahead/acceptance.py", "        if i < accepted:\n            model.accepted",
          "        if i <= accepted:\n            model.accepted",
          ("tests/test_compiled_drafter.py",)),
    Fault("harvest takes the prediction one position early", "the Jacobi harvest",
          "vllm_lookahead/jacobi_window.py", "grid[r, span + 1] = predictions[j]",
          "grid[r, span + 1] = predictions[j - 1]",
          ("tests/test_compiled_drafter.py", "tests/test_drafter.py")),
    Fault("a full key keeps one continuation too many", "the pool's eviction",
          "vllm_lookahead/ngram_cache.py", "if key.count >= pool.capacity",
          "if key.count > pool.capacity", ("tests/test_compiled_drafter.py",)),
    Fault("every request drafts from the first namespace's corpus", "namespace isolation",
          "vllm_lookahead/step.py",
          "corpus = state.no_corpus if namespace == rs.NO_NAMESPACE else state.corpora[namespace]",
          "corpus = state.corpora[0] if len(state.corpora) else state.no_corpus",
          ("tests/test_drafter.py", "tests/test_compiled_drafter.py")),
    Fault("prompt embeddings are not masked", "the prompt mask",
          "vllm_lookahead/engine_requests.py",
          "mask = np.zeros(num_prompt, dtype=bool)  # prompt_embeds only",
          "mask = np.ones(num_prompt, dtype=bool)  # prompt_embeds only",
          ("tests/test_prompt_mask.py",)),
    Fault("the drafter ignores the prompt mask", "the prompt mask", "vllm_lookahead/drafter.py",
          "            prompt[~np.asarray(info.prompt_mask, dtype=bool)] = -1\n",
          "            pass\n", ("tests/test_drafter.py", "tests/test_compiled_drafter.py")),
    Fault("chains may reach past max_model_len", "the max-model-len guard",
          "vllm_lookahead/chain.py", "max_model_len - length - 1)",
          "max_model_len - length + 1)",
          ("tests/test_drafter.py", "tests/test_compiled_drafter.py")),
    Fault("a chain's bonus token may fall where min_tokens masks the stops", "the min_tokens cap",
          "vllm_lookahead/chain.py", "stops_masked_until - length - 1)",
          "stops_masked_until - length + 1)", ("tests/test_drafter.py",)),
    Fault("the min_tokens cap is tighter than the mask needs", "the min_tokens cap",
          "vllm_lookahead/chain.py", "stops_masked_until - length - 1)",
          "stops_masked_until - length - 2)", ("tests/test_drafter.py",)),
    Fault("the compiled drafter forgets where min_tokens ends", "the min_tokens cap",
          "vllm_lookahead/step.py", "    request.stops_masked_until = a.stops_masked_until\n", "",
          ("tests/test_drafter.py",)),
    Fault("the expand repair ignores the replacement value", "the expand-kernel repair",
          "vllm_lookahead/cpu_workarounds.py",
          "values = input_val.masked_fill(input_val == replace_from, replace_to)",
          "values = input_val", ("tests/test_sampling.py",)),
    Fault("a finished request keeps its state", "request removal", "vllm_lookahead/drafter.py",
          "        state = self.states.pop(req_id, None)\n",
          "        state = self.states.get(req_id)\n",
          ("tests/test_compiled_drafter.py", "tests/test_drafter.py")),
    Fault("the removal hook forgets to tell the drafter", "request removal",
          "vllm_lookahead/runner_hooks.py",
          '            drafter.on_request_removed(_argument(args, kwargs, 0, "req_id"))\n',
          "            pass\n", ("tests/test_observability.py", "tests/test_server.py"),
          marks="engine"),
    Fault("a per-request budget is ignored", "per-request options", "vllm_lookahead/config.py",
          "        return min(k, self.num_speculative_tokens)\n", "        return k\n",
          ("tests/test_request_options.py", "tests/test_drafter.py")),
    Fault("ngram_size 1 is accepted", "config validation", "vllm_lookahead/config.py",
          '_check_int("ngram_size", self.ngram_size, 2, 16)',
          '_check_int("ngram_size", self.ngram_size, 1, 16)',
          ("tests/test_config.py", "tests/test_bad_input_table.py")),
    Fault("the index never marks a key inconsistent", "own-text matching",
          "vllm_lookahead/context_index.py",
          "                    if text[old + 1] != succ:\n                        inconsistent = "
          "INCONSISTENT\n                    table[offset + i]",
          "                    if False:\n                        inconsistent = INCONSISTENT\n"
          "                    table[offset + i]", ("tests/test_compiled_drafter.py",)),
    Fault("a seeded request drafts from the shared corpus", "seeded reproducibility",
          "vllm_lookahead/drafter.py",
          'admission["namespace"] = NO_NAMESPACE if info.seeded else namespace',
          'admission["namespace"] = namespace', ("tests/test_drafter.py",)),
    Fault("a seeded request's chain is cut with the batch", "seeded reproducibility",
          "vllm_lookahead/drafter.py", 'admission["independent"] = info.seeded',
          'admission["independent"] = False', ("tests/test_drafter.py",)),
    Fault("the engine never reports a request as seeded", "seeded reproducibility",
          "vllm_lookahead/engine_requests.py",
          "seeded=_is_seeded(params))", "seeded=False)",
          ("tests/test_engine.py", "-k", "seeded"), marks="engine"),
    Fault("an unsupported vLLM is let through", "the vLLM boundary",
          "vllm_lookahead/vllm_boundary.py",
          "    if version.startswith(tuple(v + \".\" for v in SUPPORTED_VLLM)):\n"
          "        return None",
          "    if True:\n        return None",
          ("tests/test_vllm_boundary.py", "tests/test_bad_input_table.py")),
)


@dataclasses.dataclass
class Outcome:
    fault: Fault
    caught_by: str | None
    seconds: float
    note: str = ""


def scratch_copy(into: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) plus the kernels' cache."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = into / "tree"
    for name in filter(None, files):
        if name.startswith("benchmarks/results/"):
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    cache = ROOT / "vllm_lookahead" / "__pycache__"
    if cache.is_dir():
        shutil.copytree(cache, copy / "vllm_lookahead" / "__pycache__", dirs_exist_ok=True)
    return copy


def plant(tree: Path, fault: Fault) -> None:
    path = tree / fault.path
    source = path.read_text()
    count = source.count(fault.old)
    if count != 1:
        raise LookupError(f"{fault.path}: the fault's source occurs {count} times, not once")
    path.write_text(source.replace(fault.old, fault.new))


def run_tests(tree: Path, fault: Fault) -> tuple[str | None, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m",
         fault.marks, *fault.tests], cwd=tree, env=env, capture_output=True, text=True,
        check=False)
    seconds = time.monotonic() - started
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    if result.returncode == 0:
        return None, seconds, ""
    if failed is None:
        return "?", seconds, result.stdout[-400:] + result.stderr[-400:]
    return failed.group(1), seconds, ""


def check(fault: Fault) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        tree = scratch_copy(Path(scratch))
        try:
            plant(tree, fault)
        except LookupError as e:
            return Outcome(fault, None, 0.0, f"not planted: {e}")
        caught_by, seconds, note = run_tests(tree, fault)
        return Outcome(fault, caught_by, seconds, note)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| area | fault | caught by | seconds |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = f"`{o.caught_by}`" if o.caught_by else f"**survived** {o.note}".strip()
        lines.append(f"| {o.fault.area} | {o.fault.name} | {verdict} | {o.seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the faults whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the faults and stop")
    args = parser.parse_args()
    faults = [f for f in FAULTS if args.only in f.name]
    if args.list:
        for f in faults:
            print(f"{f.area}: {f.name} ({f.path}; {' '.join(f.tests)})")
        return
    outcomes = []
    for fault in faults:
        outcome = check(fault)
        outcomes.append(outcome)
        print(f"{fault.name}: {outcome.caught_by or 'SURVIVED'} ({outcome.seconds:.0f} s) "
              f"{outcome.note}", flush=True)
    print(table(outcomes))
    sys.exit(0 if all(o.caught_by for o in outcomes) else 1)


if __name__ == "__main__":
    main()
