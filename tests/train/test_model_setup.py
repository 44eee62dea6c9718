"""Models for the trainers: a model directory's own tokenizer wins, and a tokenizer that does not fit the
model's embedding is one error naming both sizes."""

from __future__ import annotations

import jax
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.data import make_char_tokenizer
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.train.model_setup import load_model
from jaxrlhf.train.run_config import ModelSection


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A model directory with an 11-token vocabulary and its own tokenizer (a, b, c and 8 special tokens),
    and a 34-token tokenizer beside it."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_char_tokenizer("abc")
    model = LanguageModel(gpt2_config(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                                      max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0))
    hf_io.save(root / "model", model, model.init(jax.random.key(0)), tokenizer=tokenizer)
    make_char_tokenizer("abcdefghijklmnopqrstuvwxyz").save_pretrained(root / "big_tokenizer")
    return root


def test_the_model_directory_brings_its_tokenizer(small_model_dir):
    loaded = load_model(ModelSection(path=str(small_model_dir / "model")), jax.random.key(0))
    assert loaded.tokenizer.get_vocab() == make_char_tokenizer("abc").get_vocab()


def test_a_tokenizer_larger_than_the_embedding_is_one_error_naming_both_sizes(small_model_dir, tmp_path,
                                                                               capsys):
    model, tokenizer = small_model_dir / "model", small_model_dir / "big_tokenizer"
    with pytest.raises(hf_io.VocabularyMismatchError):
        load_model(ModelSection(path=str(model), tokenizer=str(tokenizer)), jax.random.key(0))
    (tmp_path / "sft.jsonl").write_text('{"prompt": "ab", "completion": "c"}\n' * 4)
    config = {"model": {"path": str(model), "tokenizer": str(tokenizer)},
              "data": {"train_file": str(tmp_path / "sft.jsonl"), "batch_size": 2, "max_prompt_length": 4,
                       "max_response_length": 4},
              "train": {"steps": 1}, "logging": {"run_dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["sft", "--config", str(tmp_path / "c.yaml")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"jaxrlhf sft: error: the tokenizer {tokenizer} has 34 tokens (ids up to 33) "
                           f"but the model {model} has vocab_size 11: ids >= 11 have no embedding")
    assert not (tmp_path / "run").exists()
