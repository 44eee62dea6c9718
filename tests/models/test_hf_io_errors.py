"""A model directory's bad files are one ``CheckpointFormatError`` / ``UnsupportedModelError`` naming the
file (one line from the CLI), and an export follows the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jax
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.data.toy_tokenizer import make_char_tokenizer
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import UnsupportedModelError, from_hf_config, llama_config
from jaxrlhf.models.transformer import LanguageModel

pytest.importorskip("transformers")

ALPHABET = "abcdefgh "


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Llama with its tokenizer, as ``hf_io.save`` exports it."""
    tokenizer = make_char_tokenizer(ALPHABET)
    cfg = llama_config(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                       intermediate_size=24, max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model = LanguageModel(cfg)
    return hf_io.save(tmp_path / "my-model", model, model.init(jax.random.key(0)), tokenizer=tokenizer)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_export_directory_follows_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        tokenizer = make_char_tokenizer(ALPHABET)
        cfg = llama_config(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=24, max_position_embeddings=32)
        model = LanguageModel(cfg)
        params = model.init(jax.random.key(0))
        out = hf_io.save(tmp_path / "run" / "export", model, params, tokenizer=tokenizer)
        assert mode(out) == 0o777 & ~mask  # not mkdtemp's 0700
        for f in out.iterdir():
            assert mode(f) == 0o666 & ~mask, f.name
        # Replacing an existing export keeps the same mode.
        out = hf_io.save(out, model, model.init(jax.random.key(1)))
        assert mode(out) == 0o777 & ~mask
        assert [p.name for p in out.parent.iterdir()] == ["export"]  # no temporary left behind
        assert os.umask(mask) == mask  # reading the umask did not change it
    finally:
        os.umask(previous)


def test_truncated_tokenizer_json_names_the_file(model_dir):
    tok = model_dir / "tokenizer.json"
    text = tok.read_text()
    tok.write_text(text[: len(text) // 2])
    with pytest.raises(hf_io.CheckpointFormatError, match=r"tokenizer\.json: invalid JSON \(") as info:
        hf_io.load_tokenizer(model_dir)
    assert str(info.value).startswith(f"{tok}: invalid JSON (")
    assert "\n" not in str(info.value)


def test_tokenizer_that_does_not_load_names_the_directory(model_dir):
    (model_dir / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')  # valid JSON, bad content
    with pytest.raises(hf_io.CheckpointFormatError) as info:
        hf_io.load_tokenizer(model_dir)
    assert str(info.value).startswith(f"{model_dir}: cannot load the tokenizer (")
    assert "\n" not in str(info.value)


def test_a_good_tokenizer_still_loads(model_dir):
    assert hf_io.load_tokenizer(model_dir).get_vocab() == make_char_tokenizer(ALPHABET).get_vocab()


LLAMA = {"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 5}, "num_heads (5) must be a multiple of num_kv_heads (2)"),
        ({"head_dim": 7}, "RoPE needs an even head_dim, got 7"),
        ({"hidden_size": 30, "num_attention_heads": 2, "num_key_value_heads": 1},
         "RoPE needs an even head_dim, got 15"),
        ({"num_attention_heads": 0}, "num_attention_heads must be >= 1, got 0"),
        ({"num_key_value_heads": "two"}, "num_key_value_heads must be an integer, got 'two'"),
    ],
)
def test_inconsistent_sizes_name_the_config_file(change, message):
    with pytest.raises(UnsupportedModelError) as info:
        from_hf_config({**LLAMA, **change}, source="my-model/config.json")
    assert str(info.value) == f"my-model/config.json: {message}"


def test_gpt2_heads_that_do_not_divide_name_the_config_file():
    hf = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 32, "n_layer": 1, "n_head": 0, "n_positions": 16}
    with pytest.raises(UnsupportedModelError, match=r"^cfg\.json: n_head must be >= 1, got 0$"):
        from_hf_config(hf, source="cfg.json")


def sft(tmp_path: Path, model_path: Path) -> int:
    (tmp_path / "sft.jsonl").write_text('{"prompt": "abc", "completion": " de"}\n' * 4)
    config = {
        "model": {"path": str(model_path)},
        "data": {"train_file": str(tmp_path / "sft.jsonl"), "batch_size": 2, "max_prompt_length": 4,
                 "max_response_length": 4},
        "train": {"steps": 1},
        "logging": {"run_dir": str(tmp_path / "run"), "mfu_matmul_size": 0, "tensorboard": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return cli.main(["sft", "--config", str(tmp_path / "config.yaml")])


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line and line.strip()]


def test_cli_corrupt_tokenizer_json_is_one_line(tmp_path, model_dir, capsys):
    tok = model_dir / "tokenizer.json"
    tok.write_text(tok.read_text()[:100])
    assert sft(tmp_path, model_dir) == 1
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"jaxrlhf sft: error: {tok}: invalid JSON ("), lines


def test_cli_inconsistent_config_json_is_one_line(tmp_path, model_dir, capsys):
    cfg_file = model_dir / "config.json"
    hf = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**hf, "num_attention_heads": 5}))
    assert sft(tmp_path, model_dir) == 1
    assert stderr_lines(capsys) == [
        f"jaxrlhf sft: error: {cfg_file}: num_heads (5) must be a multiple of num_kv_heads (2)"
    ]
