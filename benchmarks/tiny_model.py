"""A tiny random Llama model and a locally trained tokenizer, built offline: the tests' model,
and the benchmarks' that need no real one (the server soak, the near-limit check, `--model tiny`).

head_dim is 64 because vLLM's CPU attention rejects smaller heads. The output head is scaled up so
that logits are well separated: exactness tests compare greedy outputs token by token, and a model
whose top logits nearly tie would flip on float rounding alone.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from benchmarks.models import cache_root

VOCAB_SIZE = 512
WORDS = (
    "the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "red", "blue", "green",
    "house", "tree", "big", "small", "one", "two", "three", "four", "five", "river", "stone",
    "light", "dark", "fast", "slow", "up", "down", "in", "out", "yes", "no", "code", "data",
    "list", "map", "def", "return", "if", "else", "for", "while", "print", "value", "key",
    "open", "close", "start", "end",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n_lines)]


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(2000, seed=0), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)


def build_model(path: Path, seed: int = 1234) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)


def ensure_tiny_model(root: Path) -> Path:
    """Build once into `root` (a marker file is written last, so a crash is rebuilt)."""
    marker = root / "complete.json"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer(root)
    build_model(root)
    marker.write_text(json.dumps({"vocab_size": VOCAB_SIZE}))
    return root


def tiny_model() -> Path:
    """The tiny model in its cache (`VLLM_LOOKAHEAD_TEST_CACHE`, else the package cache's
    `tests`), built on first use."""
    cache = os.environ.get("VLLM_LOOKAHEAD_TEST_CACHE")
    return ensure_tiny_model((Path(cache) if cache else cache_root() / "tests") / "tiny-llama")


def make_prompts(tokenizer, n: int = 44, seed: int = 0) -> list[list[int]]:
    """Prompts of 3 to ~300 tokens; every fourth repeats a phrase, so the model (and the pool)
    sees repetition and drafts get accepted."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        if i % 4 == 0:
            phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            text = " ".join([phrase] * rng.randint(2, 12))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 8, 20, 60, 150])))
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts
