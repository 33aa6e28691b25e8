"""A tiny random Llama model and a locally trained tokenizer, built offline for the tests.

head_dim is 64 because vLLM's CPU attention rejects smaller heads. The output head is scaled up so
that logits are well separated: exactness tests compare greedy outputs token by token, and a model
whose top logits nearly tie would flip on float rounding alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
