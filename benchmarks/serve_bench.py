"""The Python side of `serve_bench.sh`: what to run, and the side-by-side table of the results.

    python -m benchmarks.serve_bench plan MODEL FILE.jsonl --out DIR [--concurrency 1,8] ...
    python -m benchmarks.serve_bench table DIR [--methods none,ngram,suffix,lookahead]

`plan` checks the prompt file (vLLM's `custom` dataset format, as `benchmarks.run --prompts`
reads it), writes each concurrency's own slice of it and the warm-up prompts as JSON-lines files
under DIR, and prints what the script needs, one tab-separated record a line: `model PATH`,
`max_model_len N`, `warmup N FILE`, `cell C N FILE` per concurrency, `method NAME CONFIG` per
method (CONFIG is the speculative config as JSON, empty for `none`).

`table` reads the result files `vllm bench serve --save-result` wrote in DIR (vLLM 0.32's keys:
`p50_ttft_ms`, `output_throughput`, `spec_decode_acceptance_rate`, ...) and prints one markdown
table: per method and concurrency, TTFT, TPOT and ITL at p50 and p99, output tokens/s, its ratio
to `none`, requests/s and vLLM's draft acceptance. Results of several rounds (`--metadata
round=R`, which serve_bench.sh sets when ROUNDS > 1) get a row each, compared with `none`'s of the
same round, and a second table pairs the rounds: each method's TTFT p50 and output tokens/s over
`none`'s, round by round. It imports neither vLLM nor the harness.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.labels import BASELINE

DEFAULT_CONCURRENCY = "1,8"
DEFAULT_METHODS = "none,ngram,suffix,lookahead"
WARMUP_OUTPUT_LEN = 16
"""As the harness's warm-up: enough steps to run every path once."""
PERCENTILES = (50, 99)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"))
RESULT_KEYS = ("max_concurrency", "output_throughput")
"""Keys every `vllm bench serve` result file has: what tells one from other JSON in DIR."""


# --- plan ----------------------------------------------------------------------------------

def result_name(method: str, concurrency: int, round_number: int | None = None) -> str:
    """The result file of one cell (of one round); method names such as `suffix[K=24]` made
    file-safe."""
    suffix = f"-r{round_number}" if round_number is not None else ""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', method)}-c{concurrency}{suffix}.json"


def speculative_configs(names: str, k: int) -> dict[str, dict[str, Any] | None]:
    """The harness's methods (the same speculative configs at K = k), in the order given."""
    from benchmarks import methods

    builtins = methods.builtin_methods(k)
    chosen = methods.chosen_names(names, builtins, methods.SUFFIX_DEFAULT_DEPTH, "methods")
    if not chosen:
        raise SystemExit(f"methods: none given; known: {', '.join(builtins)}")
    return {name: builtins[name] for name in chosen}


def plan_cells(path: Path, concurrencies: Sequence[int], num_prompts: str, output_len: int
               ) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """The file's lines as `custom`-dataset records and, per concurrency, the indices of its own
    consecutive slice (the harness's slicing: no prompt reaches a server twice, so a cache of
    earlier responses can recall only other requests' answers)."""
    from benchmarks import datasets, prompt_plan

    try:
        found = datasets.read_prompt_file(path)
    except ValueError as e:
        raise SystemExit(f"prompts: {e}") from None
    sizes = prompt_plan.cell_sizes(concurrencies, prompt_plan.parse_num_prompts(num_prompts))
    try:
        slices = prompt_plan.slice_prompts(list(range(len(found.prompts))), sizes)
    except ValueError as e:
        raise SystemExit(f"prompts {path}: {e} ({prompt_plan.sizes_text(sizes)}); add prompts, "
                         "or ask for fewer with NUM_PROMPTS or fewer concurrencies") from None
    used = [found.prompts[i] for indices in slices.values() for i in indices]
    if len(set(used)) < len(used):
        raise SystemExit(f"prompts {path}: the same prompt twice in the cells: each prompt may "
                         "reach a server once")
    if output_len == -1 and (lacking := [i + 1 for ids in slices.values() for i in ids
                                         if found.output_tokens[i] is None]):
        raise SystemExit(f"prompts {path}: OUTPUT_LEN -1 takes each prompt's "
                         f"\"output_tokens\", which prompts {lacking[:5]} lack")
    records = [{"prompt": p, **({"output_tokens": n} if n is not None else {})}
               for p, n in zip(found.prompts, found.output_tokens, strict=True)]
    return records, slices


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def plan(args: argparse.Namespace) -> list[str]:
    from benchmarks import datasets
    from benchmarks import engine as eng

    concurrencies = sorted({int(c) for c in args.concurrency.split(",")})
    configs = speculative_configs(args.methods, args.k)
    records, slices = plan_cells(args.prompts, concurrencies, args.num_prompts, args.output_len)
    model = resolve_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"model\t{model}"]
    warmup = [{"prompt": t} for t in eng.warmup_texts(max(concurrencies))]
    cells = []
    for c, indices in slices.items():
        cells.append((c, len(indices), args.out / f"prompts-c{c}.jsonl"))
        write_jsonl(cells[-1][2], [records[i] for i in indices])
    write_jsonl(args.out / "warmup.jsonl", warmup)
    tokenizer = eng.load_tokenizer(model)
    used = [records[i] for indices in slices.values() for i in indices]
    longest_output = max(args.output_len, WARMUP_OUTPUT_LEN,
                         *(r.get("output_tokens", 0) for r in used))
    prompts = datasets.chat_template(tokenizer, [r["prompt"] for r in used])
    max_model_len = eng.model_len_for(prompts, tokenizer, longest_output, len(warmup))
    lines.append(f"max_model_len\t{max_model_len}")
    lines.append(f"warmup\t{len(warmup)}\t{args.out / 'warmup.jsonl'}")
    lines += [f"cell\t{c}\t{n}\t{path}" for c, n, path in cells]
    lines += [f"method\t{name}\t{json.dumps(config) if config else ''}"
              for name, config in configs.items()]
    return lines


def resolve_model(name: str) -> Path | str:
    """A benchmark model's or the tiny model's folder; anything else goes to vLLM as given."""
    from benchmarks import engine as eng
    from benchmarks.models import MODELS

    return eng.resolve_model(name) if name in (*MODELS, eng.TINY_MODEL) else name


# --- table ---------------------------------------------------------------------------------

def load_results(folder: Path) -> list[dict[str, Any]]:
    """The `vllm bench serve` result files in `folder`; other JSON there is left alone."""
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(k in data for k in RESULT_KEYS):
            results.append(data)
    return results


def method_of(result: Mapping[str, Any]) -> str:
    # serve_bench.sh passes `--metadata method=NAME`; a user's own runs have at least a label.
    return str(result.get("method") or result.get("label") or result.get("backend") or "?")


def round_of(result: Mapping[str, Any]) -> int:
    """The round a result belongs to (serve_bench.sh's `--metadata round=R`); 1 without one."""
    return int(result.get("round") or 1)


def _cell(result: Mapping[str, Any]) -> tuple[Any, int]:
    return result.get("max_concurrency"), round_of(result)


def _several_rounds(results: Sequence[Mapping[str, Any]]) -> bool:
    return len({round_of(r) for r in results}) > 1


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def percentile_ms(result: Mapping[str, Any], metric: str, p: int) -> float | None:
    """vLLM writes p<P>_<metric>_ms for each --metric-percentiles (99 alone by default) and
    median_<metric>_ms always, which is the p50 of a run that did not ask for it."""
    value = result.get(f"p{p}_{metric}_ms")
    if value is None and p == 50:
        value = result.get(f"median_{metric}_ms")
    return value


def ordered(results: Sequence[Mapping[str, Any]], methods: Sequence[str] = ()
            ) -> list[Mapping[str, Any]]:
    """By method (those given first in their order, the baseline first among the rest), then
    concurrency, then round."""
    seen = list(dict.fromkeys([*methods, *sorted({method_of(r) for r in results},
                                                  key=lambda m: (m != BASELINE, m))]))
    return sorted(results, key=lambda r: (seen.index(method_of(r)),
                                          r.get("max_concurrency") or 0, round_of(r)))


def _num(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(results: Sequence[Mapping[str, Any]], methods: Sequence[str] = ()) -> list[str]:
    rows = ordered(results, methods)
    baseline = {_cell(r): r["output_throughput"] for r in rows if method_of(r) == BASELINE}
    rounds = _several_rounds(rows)
    header = ["method", "c", *(["round"] if rounds else []), "requests",
              *(f"{label} p{p} ms" for _, label in LATENCIES for p in PERCENTILES),
              "output tok/s", f"x {BASELINE}", "req/s", "acceptance", "acceptance length"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        base = baseline.get(_cell(r))
        rate = r.get("spec_decode_acceptance_rate")
        cells = [method_of(r), str(r.get("max_concurrency")),
                 *([str(round_of(r))] if rounds else []), str(r.get("completed", "-")),
                 *(_num(percentile_ms(r, metric, p), ".2f")
                   for metric, _ in LATENCIES for p in PERCENTILES),
                 _num(r["output_throughput"], ".1f"),
                 _num(_ratio(r["output_throughput"], base), ".2f"),
                 _num(r.get("request_throughput"), ".3f"),
                 _num(rate, ".1f") + (" %" if rate is not None else ""),
                 _num(r.get("spec_decode_acceptance_length"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_rounds(results: Sequence[Mapping[str, Any]], methods: Sequence[str] = ()
                  ) -> list[str]:
    """Each method's TTFT p50 and output tokens/s over `none`'s in the same round, round by
    round (empty unless there are several rounds and a baseline)."""
    rows = ordered(results, methods)
    base = {_cell(r): r for r in rows if method_of(r) == BASELINE}
    if not _several_rounds(rows) or not base:
        return []
    lines = [f"| method | c | TTFT p50 / {BASELINE}'s, by round | output tok/s / {BASELINE}'s, "
             "by round |", "|---|---|---|---|"]
    by_cell: dict[tuple[str, Any], list[tuple[str, str]]] = {}
    for r in rows:
        b = base.get(_cell(r))
        if method_of(r) == BASELINE or b is None:
            continue
        by_cell.setdefault((method_of(r), r.get("max_concurrency")), []).append((
            _num(_ratio(percentile_ms(r, "ttft", 50), percentile_ms(b, "ttft", 50)), ".2f"),
            _num(_ratio(r["output_throughput"], b["output_throughput"]), ".2f")))
    for (method, c), ratios in by_cell.items():
        lines.append(f"| {method} | {c} | {' / '.join(t for t, _ in ratios)} | "
                     f"{' / '.join(x for _, x in ratios)} |")
    return lines


def notes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the table's numbers cannot show: failed requests."""
    rounds = _several_rounds(results)
    return [f"{method_of(r)} at c={r.get('max_concurrency')}"
            f"{f' (round {round_of(r)})' if rounds else ''}: {r['failed']} of "
            f"{r['failed'] + r.get('completed', 0)} requests failed"
            for r in results if r.get("failed")]


def report(folder: Path, methods: Sequence[str] = ()) -> str:
    results = load_results(folder)
    if not results:
        raise SystemExit(f"{folder}: no `vllm bench serve` result files")
    models = sorted({str(r.get("model_id")) for r in results})
    return "\n".join([
        f"`vllm bench serve` on {', '.join(f'`{m}`' for m in models)} ({folder})", "",
        *table(results, methods), "",
        f"Latencies in ms. Acceptance: accepted / drafted tokens and mean acceptance length (1 + "
        f"accepted / drafts), as vLLM bench reads them from the server's /metrics around each "
        f"run; `-` for a method that drafts nothing. x {BASELINE}: output tokens/s over "
        f"{BASELINE}'s at the same concurrency (and round).",
        *(["", *paired] if (paired := paired_rounds(results, methods)) else []),
        *(f"**{line}**" for line in notes(results)), ""])


# --- command line --------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="check the prompts, write the cells' files, print the "
                                         "records the script reads")
    p.add_argument("model")
    p.add_argument("prompts", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--concurrency", default=DEFAULT_CONCURRENCY)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--num-prompts", default="4",
                   help="prompts per concurrency: N is at least N, raised to c; or c:N,c:N "
                        "(%(default)s)")
    p.add_argument("--output-len", type=int, default=128,
                   help="vLLM bench's --custom-output-len; -1 takes each line's output_tokens")
    p.add_argument("--k", type=int, default=8)
    t = commands.add_parser("table", help="the markdown table of the result files in DIR")
    t.add_argument("folder", type=Path)
    t.add_argument("--methods", default="", help="row order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "plan":
        print("\n".join(plan(args)), flush=True)
    else:
        text = report(args.folder, [m for m in args.methods.split(",") if m])
        (args.folder / "results.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
