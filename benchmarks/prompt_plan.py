"""Which prompts each benchmark cell sends: every concurrency its own disjoint slice of each
set, so that no prompt reaches one engine twice."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.datasets import (
    PROMPT_SETS,
    RELATED_SETS,
    Prompt,
    chat_template,
    read_prompt_file,
)
from benchmarks.datasets import load_prompts as load_texts
from benchmarks.labels import ALL_DATASETS

T = TypeVar("T")


def parse_num_prompts(text: str) -> int | dict[int, int]:
    """`"4"`: at least 4 prompts per set in every cell (c at concurrency c); `"1:4,8:16,32:32"`:
    exactly these per concurrency."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    sizes = {}
    for item in text.split(","):
        c, sep, n = item.partition(":")
        if not sep or not c.strip().isdigit() or not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad {item!r}: use N or c:N,c:N,...")
        sizes[int(c)] = int(n)
    return sizes


def cell_sizes(concurrencies: Sequence[int], num_prompts: int | Mapping[int, int]
               ) -> dict[int, int]:
    """Prompts per set in each concurrency's cells: an int is a floor, raised to c so that c
    requests start in flight; a mapping must name every concurrency."""
    if isinstance(num_prompts, int):
        return {c: max(num_prompts, c) for c in concurrencies}
    missing = [c for c in concurrencies if c not in num_prompts]
    if missing:
        raise SystemExit(f"--num-prompts names no size for concurrency {missing}")
    return {c: num_prompts[c] for c in concurrencies}


def slice_prompts(prompts: Sequence[T], sizes: Mapping[int, int], reuse: bool = False
                  ) -> dict[int, list[T]]:
    """Each concurrency's prompts, in increasing concurrency: consecutive disjoint slices from the
    start of `prompts`, or with `reuse` the first prompts again at every level (the old design,
    where a cross-request cache could recall earlier answers)."""
    need = prompts_needed(sizes, reuse)
    if len(prompts) < need:
        raise ValueError(f"{len(prompts)} prompts, the cells need {need}")
    slices, start = {}, 0
    for c in sorted(sizes):
        slices[c] = list(prompts[start:start + sizes[c]])
        if not reuse:
            start += sizes[c]
    return slices


def prompts_needed(sizes: Mapping[int, int], reuse: bool = False) -> int:
    return max(sizes.values(), default=0) if reuse else sum(sizes.values())


def plan_prompts(datasets: Sequence[str], sizes: Mapping[int, int], reuse: bool = False,
                 load: Callable[[str, int], list[Prompt]] = load_texts
                 ) -> dict[str, dict[int, list[Prompt]]]:
    """Per dataset and concurrency, the user messages its cell sends."""
    unknown = sorted(set(datasets) - set(PROMPT_SETS))
    if unknown or not datasets:
        raise SystemExit(f"--datasets: unknown {unknown or 'none given'}; known: "
                         f"{', '.join(PROMPT_SETS)}")
    plan = {}
    for name in datasets:
        try:
            plan[name] = slice_prompts(load(name, prompts_needed(sizes, reuse)), sizes, reuse)
        except ValueError as e:
            raise SystemExit(f"--num-prompts: {name}: {e} ({sizes_text(sizes)})") from None
    return _no_repeats(plan, reuse)


RESERVED_SET_NAMES = frozenset({ALL_DATASETS, *RELATED_SETS})
"""Names the report gives a meaning of its own: a prompt file may not be named after them."""


def plan_file_prompts(path: Path, sizes: Mapping[int, int], reuse: bool = False
                      ) -> dict[str, dict[int, list[Prompt]]]:
    """A user's prompt file (vLLM's `custom` dataset format) as the plan's one set, named after
    the file and sliced per concurrency like the built-in sets."""
    try:
        found = read_prompt_file(path)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}") from None
    if found.name in RESERVED_SET_NAMES:
        raise SystemExit(f"--prompts {path}: the report reserves the name {found.name!r} "
                         "(from the file's name); rename the file")
    try:
        plan = {found.name: slice_prompts(found.prompts, sizes, reuse)}
    except ValueError as e:
        raise SystemExit(f"--prompts {path}: {e} ({sizes_text(sizes)}); add prompts, or ask "
                         "for fewer with --num-prompts or --concurrency") from None
    return _no_repeats(plan, reuse)


def sizes_text(sizes: Mapping[int, int]) -> str:
    return " + ".join(f"{n} at c={c}" for c, n in sizes.items())


def _no_repeats(plan: dict[str, dict[int, list[T]]], reuse: bool) -> dict[str, dict[int, list[T]]]:
    if not reuse and (repeated := repeated_prompts(plan)):
        raise SystemExit(f"prompts that would be submitted twice to one engine: {repeated[:3]}")
    return plan


def repeated_prompts(plan: Mapping[str, Mapping[int, Sequence[T]]]) -> list[T]:
    """Prompts that occur more than once anywhere in the plan (all of it runs in one engine)."""
    seen: set[Any] = set()
    repeated = []
    for by_c in plan.values():
        for prompts in by_c.values():
            for p in prompts:
                key = tuple(p) if isinstance(p, list) else p
                if key in seen:
                    repeated.append(p)
                seen.add(key)
    return repeated


def tokenize_plan(plan: Mapping[str, Mapping[int, Sequence[Prompt]]], tokenizer: Any
                  ) -> dict[str, dict[int, list[list[int]]]]:
    return {name: {c: chat_template(tokenizer, texts) for c, texts in by_c.items()}
            for name, by_c in plan.items()}
