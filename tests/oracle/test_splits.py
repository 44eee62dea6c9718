"""Disjoint prompt splits: every split draws only its own prompts, the overlap report counts correctly."""

import numpy as np
import pytest

from jaxrlhf.oracle import get_task
from jaxrlhf.oracle.tasks import SPLIT_FRACTIONS, SPLITS, prompt_overlap_report, prompt_split
from jaxrlhf.oracle.tasks.splits import prompt_hash


def test_the_partition_is_fixed_and_balanced():
    assert prompt_split("3 1 4") == prompt_split("<bos> 3  1 4") == prompt_split("3 1 4 <pad>")
    task = get_task("digit_sort")
    prompts = task.sample_prompts(0, 20_000)
    hashes = np.array([prompt_hash(p) for p in set(prompts)])
    assert np.all((hashes >= 0) & (hashes < 1))
    share = {s: np.mean([prompt_split(p) == s for p in set(prompts)]) for s in SPLITS}
    for split, fraction in SPLIT_FRACTIONS.items():
        assert abs(share[split] - fraction) < 0.02, share


@pytest.mark.parametrize("name", ["digit_sort", "arithmetic"])
def test_splits_are_disjoint(name):
    task = get_task(name)
    assert task.disjoint_splits and task.prompt_space_size() >= 10_000
    lists = {
        split: task.sample_prompts(np.random.default_rng([7, i]), 600, split=split)
        for i, split in enumerate(SPLITS)
    }
    lists["demonstrations"] = [d["prompt"] for d in task.demonstrations(3, 600, split="sft")]
    for split in SPLITS:
        assert len(lists[split]) == 600 and {prompt_split(p) for p in lists[split]} == {split}
    report = prompt_overlap_report(lists)
    for a, b in report.overlaps:
        if {a, b} != {"sft", "demonstrations"}:
            assert report.overlap(a, b) == 0, (a, b)
    assert report.max_overlap == report.overlap("demonstrations", "sft") > 0  # same split, shared prompts
    assert report.counts["eval"] == 600 and report.distinct["eval"] <= 600
    assert "overlap sft/eval: 0 prompts" in report.lines()
    # a larger request extends a smaller one
    assert task.sample_prompts(1, 700, split="eval")[:50] == task.sample_prompts(1, 50, split="eval")
    # the whole space: the same draws as before splits existed (the demo's default keeps its numbers)
    assert task.sample_prompts(5, 50) == task.draw_prompts(np.random.default_rng(5), 50)


def test_random_walk_reports_its_overlap():
    task = get_task("random_walk")
    assert not task.disjoint_splits and task.prompt_space_size() == 11
    train, held_out = task.sample_prompts(0, 200, split="rl"), task.sample_prompts(1, 200, split="eval")
    report = prompt_overlap_report({"rl": train, "eval": held_out})
    assert report.overlap("rl", "eval") == report.distinct["eval"] == 11  # every start node in both
    assert report.lines()[0] == "rl: 200 prompts (11 distinct)"


def test_bad_split_and_too_small_space():
    task = get_task("digit_sort")
    with pytest.raises(ValueError, match=r"unknown prompt split 'test'; the splits are \['sft'"):
        task.sample_prompts(0, 5, split="test")

    class OnePrompt(type(task)):
        """digit_sort with a single prompt, "0" (in the eval split)."""

        def draw_prompts(self, rng, n):
            return ["0"] * n

    tiny = OnePrompt()
    assert prompt_split("0") == "eval" and tiny.sample_prompts(0, 3, split="eval") == ["0"] * 3
    with pytest.raises(ValueError, match=r"only 0 of \d+ prompts drawn fell in split 'sft'.*too small"):
        tiny.sample_prompts(0, 5, split="sft")
