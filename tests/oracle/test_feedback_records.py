"""Feedback records from a pool: formats, deterministic annotators, reproducibility, coverage."""

import json

import jax
import pytest

from jaxrlhf.oracle import AnnotatorConfig, annotate_pool, coverage_report

PROMPTS = ["p1", "p2", "p3"]
RESPONSES = [["a", "b", "c"], ["x", "x", "y"], ["solo"]]
GOLD = [[0.1, 0.9, 0.5], [0.3, 0.3, -0.2], [1.0]]
KEY = jax.random.key(0)


def test_deterministic_preferences_and_coverage():
    records = annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, AnnotatorConfig("preference", temperature=0.0))
    # p1: 3 pairs; p2: the two "x" are identical, so 2 pairs; p3: none
    assert records == [
        {"prompt": "p1", "chosen": "b", "rejected": "a"},
        {"prompt": "p1", "chosen": "c", "rejected": "a"},
        {"prompt": "p1", "chosen": "b", "rejected": "c"},
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
    ]
    json.dumps(records)  # ready for JSONL
    assert coverage_report(records) == {
        "kind": "preference",
        "records": 5,
        "distinct_prompts": 2,
        "distinct_responses": 5,
        "distinct_prompt_responses": 5,
        "comparisons": 5,
        "distinct_comparisons": 4,
    }


def test_preferences_subsample_and_reproducible():
    config = AnnotatorConfig("preference", temperature=1.0, flip_prob=0.1, pairs_per_prompt=1)
    first = annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, config)
    assert first == annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, config)
    assert [r["prompt"] for r in first] == ["p1", "p2"]
    for r in first:
        assert r["chosen"] != r["rejected"]


def test_rankings():
    records = annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, AnnotatorConfig("ranking", temperature=0.0))
    assert records[0] == {"prompt": "p1", "responses": ["b", "c", "a"]}
    # p2's repeated "x" is ranked once: a ranking holding it twice would tie it with itself
    assert records[1] == {"prompt": "p2", "responses": ["x", "y"]}
    assert len(records) == 2  # a prompt with one response cannot be ranked
    report = coverage_report(records)
    assert report["comparisons"] == 4 and report["distinct_responses"] == 5
    for temperature in (1.0, 5.0):
        config = AnnotatorConfig("ranking", temperature=temperature)
        for r in annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, config):
            assert len(set(r["responses"])) == len(r["responses"])
    noisy = annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, AnnotatorConfig("ranking", temperature=5.0))
    assert sorted(noisy[0]["responses"]) == ["a", "b", "c"]


def test_ratings():
    config = AnnotatorConfig("rating", noise_std=0.0, num_levels=4, rating_low=0.0, rating_high=1.0)
    records = annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, config)
    assert [r["rating"] for r in records] == [1, 4, 3, 2, 2, 1, 4]
    assert records[0] == {"prompt": "p1", "response": "a", "rating": 1}
    assert all(type(r["rating"]) is int for r in records)
    report = coverage_report(records)
    assert (report["records"], report["distinct_prompts"], report["comparisons"]) == (7, 3, 0)
    assert report["distinct_prompt_responses"] == 6


def test_bad_pools_and_records():
    config = AnnotatorConfig()
    with pytest.raises(ValueError, match="pool sizes differ"):
        annotate_pool(KEY, PROMPTS[:2], RESPONSES, GOLD, config)
    with pytest.raises(ValueError, match="pool row 1: 3 responses but 2 gold scores"):
        annotate_pool(KEY, PROMPTS, RESPONSES, [GOLD[0], [0.1, 0.2], GOLD[2]], config)
    with pytest.raises(ValueError, match="kind must be one of"):
        annotate_pool(KEY, PROMPTS, RESPONSES, GOLD, AnnotatorConfig(kind="votes"))
    with pytest.raises(ValueError, match="mix feedback formats"):
        coverage_report(
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "responses": ["a"]}]
        )
    with pytest.raises(ValueError, match="record 0 has keys"):
        coverage_report([{"prompt": "p"}])
    assert coverage_report([])["records"] == 0


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("temperature", -1.0, "a finite number >= 0"), ("temperature", float("nan"), "a finite number >= 0"),
    ("flip_prob", 1.5, r"in \[0, 1\]"), ("noise_std", -0.1, "a finite number >= 0"),
    ("num_levels", 1, ">= 2"), ("pairs_per_prompt", -1, ">= 0"),
    ("rating_high", -2.0, "finite and above rating_low"),
])
def test_annotator_values_are_checked_where_they_are_written(field, value, rule):
    """A negative τ reached the annotator mid-study (a traceback after the run directory was written) or
    was used as is; the config refuses it, naming the field (the CLI turns it into the dotted key)."""
    with pytest.raises(ValueError, match=rf"AnnotatorConfig\.{field} must be {rule}"):
        AnnotatorConfig(**{field: value})
    AnnotatorConfig(temperature=jax.numpy.asarray(-1.0))  # a traced or stacked sweep value: checked later
