"""Which prompts each benchmark cell sends (`benchmarks.prompt_plan`): every concurrency its own
slice, no prompt twice to one engine, and a user's prompt file in vLLM's custom dataset format."""

import pytest

from benchmarks import datasets, prompt_plan
from tests.conftest import write_jsonl


def test_each_concurrency_gets_its_own_consecutive_prompts():
    prompts = [f"p{i}" for i in range(50)]
    sizes = prompt_plan.cell_sizes([1, 8, 32], 4)
    assert sizes == {1: 4, 8: 8, 32: 32}
    slices = prompt_plan.slice_prompts(prompts, sizes)
    assert slices == {1: prompts[:4], 8: prompts[4:12], 32: prompts[12:44]}
    # The old design replays the first prompts at every level.
    assert prompt_plan.slice_prompts(prompts, sizes, reuse=True)[8] == prompts[:8]
    with pytest.raises(ValueError, match="43 prompts, the cells need 44"):
        prompt_plan.slice_prompts(prompts[:43], sizes)


def test_num_prompts_is_a_floor_or_an_explicit_size_per_concurrency():
    assert prompt_plan.parse_num_prompts("4") == 4
    assert prompt_plan.parse_num_prompts("1:4,8:16") == {1: 4, 8: 16}
    sizes = prompt_plan.parse_num_prompts("1:4,8:16")
    assert prompt_plan.cell_sizes([1, 8], sizes) == {1: 4, 8: 16}
    with pytest.raises(SystemExit, match=r"concurrency \[32\]"):
        prompt_plan.cell_sizes([1, 32], {1: 4})
    with pytest.raises(Exception, match="c:N"):
        prompt_plan.parse_num_prompts("1=4")


def test_the_plan_never_sends_a_prompt_twice_and_every_method_gets_the_same_slices():
    sets = {"mtbench": [f"m{i}" for i in range(80)], "gsm8k": [f"g{i}" for i in range(100)]}
    plan = prompt_plan.plan_prompts(["mtbench", "gsm8k"], {1: 2, 4: 4},
                                    load=lambda n, k: sets[n][:k])
    assert plan == {"mtbench": {1: ["m0", "m1"], 4: ["m2", "m3", "m4", "m5"]},
                    "gsm8k": {1: ["g0", "g1"], 4: ["g2", "g3", "g4", "g5"]}}
    overlapping = {"mtbench": ["a", "b", "c"], "gsm8k": ["c", "d", "e"]}
    with pytest.raises(SystemExit, match="submitted twice"):
        prompt_plan.plan_prompts(["mtbench", "gsm8k"], {1: 3}, load=lambda n, k: overlapping[n][:k])
    with pytest.raises(SystemExit, match="mtbench: 80 prompts, the cells need 81"):
        prompt_plan.plan_prompts(["mtbench"], {1: 1, 8: 80}, load=lambda n, k: sets[n][:k])
    assert prompt_plan.repeated_prompts({"a": {1: [[1, 2], [3]]}, "b": {1: [[1, 2]]}}) == [[1, 2]]


# --- your own prompts (`benchmarks.run --prompts`, vLLM's custom dataset format) -------------


def test_a_prompt_file_reads_as_vllms_custom_dataset_reads_it(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        '{"prompt": "What is the capital of India?", "output_tokens": 10}',
        "",  # blank lines are skipped
        '{"prompt": "Name a river.", "id": 7}',  # other fields are ignored, as vLLM does
        '{"prompt": "Count to three.", "output_tokens": "12"}',
    ])
    found = datasets.read_prompt_file(path)
    assert found.name == "mine"
    assert found.prompts == ["What is the capital of India?", "Name a river.", "Count to three."]
    assert found.output_tokens == [10, None, 12]


@pytest.mark.parametrize(("name", "lines", "message"), [
    ("mine.jsonl", ['{"prompt": "a"}', '{"text": "b"}'], r"mine\.jsonl:2: no \"prompt\" field"),
    ("mine.jsonl", ['{"prompt": ["a"]}'], r":1: \"prompt\" must be a string"),
    ("mine.jsonl", ['{"prompt": "a"', ], r":1: not JSON"),
    ("mine.jsonl", ['["a"]'], r":1: a line must be a JSON object"),
    ("mine.jsonl", ['{"prompt": "a", "output_tokens": 2.5}'], r"positive integer, not 2\.5"),
    ("mine.jsonl", ['{"prompt": "a", "output_tokens": 0}'], r"positive integer, not 0"),
    ("mine.jsonl", ["", " "], r"mine\.jsonl: no prompts"),
    ("mine.json", ['{"prompt": "a"}'], r"named \*\.jsonl"),
])
def test_a_bad_prompt_file_is_refused_with_its_line(tmp_path, name, lines, message):
    with pytest.raises(ValueError, match=message):
        datasets.read_prompt_file(write_jsonl(tmp_path / name, lines))


def test_a_prompt_file_is_one_set_named_after_it_and_sliced_per_concurrency(tmp_path):
    path = write_jsonl(tmp_path / "support-tickets.jsonl",
                       [f'{{"prompt": "ticket {i}"}}' for i in range(6)])
    plan = prompt_plan.plan_file_prompts(path, {1: 2, 4: 4})
    assert plan == {"support-tickets": {1: ["ticket 0", "ticket 1"],
                                        4: ["ticket 2", "ticket 3", "ticket 4", "ticket 5"]}}
    with pytest.raises(SystemExit, match=r"6 prompts, the cells need 10 \(2 at c=1 \+ 8 at c=8\); "
                                         r"add prompts, or ask for fewer"):
        prompt_plan.plan_file_prompts(path, {1: 2, 8: 8})
    with pytest.raises(SystemExit, match=r"--prompts: .*nothing\.jsonl: no such file"):
        prompt_plan.plan_file_prompts(tmp_path / "nothing.jsonl", {1: 1})
    with pytest.raises(SystemExit, match=r"no \"prompt\" field"):
        prompt_plan.plan_file_prompts(write_jsonl(tmp_path / "x.jsonl", ['{"q": 1}']), {1: 1})
    twice = write_jsonl(tmp_path / "twice.jsonl", ['{"prompt": "a"}', '{"prompt": "a"}'])
    with pytest.raises(SystemExit, match="submitted twice"):
        prompt_plan.plan_file_prompts(twice, {1: 1, 2: 1})
    with pytest.raises(SystemExit, match="reserves the name 'all'"):
        reserved = write_jsonl(tmp_path / "all.jsonl", ['{"prompt": "a"}'])
        prompt_plan.plan_file_prompts(reserved, {1: 1})
