"""Hugging Face checkpoint I/O: round trips, sharded checkpoints, and the errors for bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrlhf.data.toy_tokenizer import make_char_tokenizer
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import UnsupportedModelError, gpt2_config, llama_config
from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OUR_CONFIGS = {
    "gpt2": gpt2_config(
        vocab_size=48,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=32,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "llama-gqa": llama_config(
        vocab_size=48,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
    ),
    "qwen2-tied": llama_config(
        model_type="qwen2",
        qkv_bias=True,
        tie_word_embeddings=True,
        vocab_size=48,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=1,
        intermediate_size=40,
    ),
    "mistral-window": llama_config(
        model_type="mistral",
        sliding_window=4,
        vocab_size=48,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=40,
    ),
}


def _tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("name", sorted(OUR_CONFIGS))
def test_save_loads_in_transformers_with_same_logits(name, tmp_path):
    model = LanguageModel(OUR_CONFIGS[name])
    params = jax.tree.map(lambda p: p * 3.0, model.init(jax.random.key(1)))
    tokenizer = make_char_tokenizer("abcdefgh")
    out = hf_io.save(tmp_path / "export", model, params, tokenizer=tokenizer)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = np.random.RandomState(0).randint(3, 48, size=(2, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits.numpy()
    ours, _, _ = model.apply(params, tokens, pos, mask)
    assert np.abs(np.asarray(ours) - ref)[mask > 0].max() <= 1e-4

    # And back: the same config and bit-identical params, plus the tokenizer.
    model2, params2, tok2 = hf_io.load(out)
    assert model2.config == model.config
    assert _tree_equal(params, params2)
    assert tok2.decode(tok2("abc")["input_ids"]) == tokenizer.decode(tokenizer("abc")["input_ids"])


def test_sharded_checkpoints_both_ways(hf_checkpoint, tmp_path):
    _, path, hf_model = hf_checkpoint
    hf_model.save_pretrained(tmp_path / "hf-sharded", max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "hf-sharded" / hf_io.INDEX_FILE).is_file()
    model, params, _ = hf_io.load(path)
    _, sharded, _ = hf_io.load(tmp_path / "hf-sharded")
    assert _tree_equal(params, sharded)

    ours = hf_io.save(tmp_path / "ours-sharded", model, params, max_shard_bytes=16_000)
    index = json.loads((ours / hf_io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours)
    ref_sd, new_sd = hf_model.state_dict(), reloaded.state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(v, new_sd[k]), k


def test_heads_round_trip(tmp_path):
    model = LanguageModel(OUR_CONFIGS["gpt2"])
    params = model.init(jax.random.key(0))
    heads = {"value_head": init_value_head(32), "reward_head": init_reward_head(jax.random.key(3), 32)}
    out = hf_io.save(tmp_path / "m", model, params, heads=heads)
    assert _tree_equal(hf_io.load_heads(out), heads)
    assert hf_io.load_heads(tmp_path) == {}


def test_failed_save_keeps_the_previous_export(tmp_path, monkeypatch):
    model = LanguageModel(OUR_CONFIGS["gpt2"])
    params = model.init(jax.random.key(0))
    good = hf_io.save(tmp_path / "m", model, params)
    before = load_file(str(good / "model.safetensors"))

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    from jaxrlhf.files import OutputWriteError

    # one line naming the export (the CLI prints it as is; a write error was a traceback)
    with pytest.raises(OutputWriteError, match=rf"^cannot write the export {tmp_path / 'm'}: disk full \(the "
                                                r"previous export, if any, is intact\)$"):
        hf_io.save(tmp_path / "m", model, jax.tree.map(lambda p: p + 1, params), tokenizer=Broken())
    after = load_file(str(good / "model.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left behind
    # safetensors' own error (a file-size limit: "File too large (os error 27)") too
    from safetensors import SafetensorError

    def too_large(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })")

    import safetensors.numpy

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.numpy, "save_file", too_large)  # save() imports it when called
        with pytest.raises(OutputWriteError, match=r"cannot write the export .*FileTooLarge"):
            hf_io.save(tmp_path / "m", model, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # a bug is still a traceback of its own type
    class Bug:
        def save_pretrained(self, path):
            raise KeyError("not an output problem")

    with pytest.raises(KeyError):
        hf_io.save(tmp_path / "m", model, params, tokenizer=Bug())


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def saved(tmp_path):
    model = LanguageModel(OUR_CONFIGS["llama-gqa"])
    return hf_io.save(tmp_path / "m", model, model.init(jax.random.key(0)))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        hf_io.CheckpointFormatError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj"
    ):
        hf_io.load(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(
        hf_io.CheckpointFormatError,
        match=r"unexpected tensor 'model\.layers\.0\.extra\.weight' in model\.safetensors",
    ):
        hf_io.load(saved)


def test_shape_mismatch_is_named(saved):
    _edit_tensors(
        saved, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((32, 41), np.float32)})
    )
    with pytest.raises(
        hf_io.CheckpointFormatError,
        match=r"shape mismatch for model\.layers\.0\.mlp\.down_proj\.weight.*\(32, 41\)",
    ):
        hf_io.load(saved)


def test_unsupported_architecture_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type 'bert' is not supported"):
        hf_io.load(saved)
    (saved / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        hf_io.load(saved)


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_io.load(tmp_path / "nowhere")
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(
        hf_io.CheckpointFormatError, match=r"no model\.safetensors.*pytorch_model\.bin.*pickle"
    ):
        hf_io.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(hf_io.CheckpointFormatError, match=r"no config\.json"):
        hf_io.load(saved)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    _, _, hf_model = hf_checkpoint
    hf_model.save_pretrained(tmp_path / "s", max_shard_size="20KB", safe_serialization=True)
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(hf_io.CheckpointFormatError, match=f"lists shard '{shard.name}', which is missing"):
        hf_io.load(tmp_path / "s")


# ------------------------------------------------------------------------------ several end-of-sequence ids


def test_every_eos_id_survives_load_and_export(tmp_path):
    """A config listing several eos ids (Llama 3 Instruct lists three) keeps them all: the exported model
    stops in transformers' ``generate`` where the original stops, at its second eos id."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=2, bos_token_id=1, pad_token_id=0)
    original = transformers.LlamaForCausalLM(hf_cfg).eval()
    prompt = torch.tensor([[5, 9, 11, 3]])
    greedy = lambda m: m.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=0)[0, 4:].tolist()
    with torch.no_grad():
        free = original.generate(prompt, do_sample=False, max_new_tokens=8, eos_token_id=None,
                                 pad_token_id=0)[0, 4:].tolist()
    second = free[2]  # greedy decoding's third token becomes the second eos id: generation must stop there
    assert second not in (0, 2) and second not in free[:2], free  # holds for this seed
    original.config.eos_token_id = original.generation_config.eos_token_id = [2, second]
    original.save_pretrained(tmp_path / "src")

    model, params, _ = hf_io.load(tmp_path / "src", tokenizer=False)
    assert (model.config.eos_token_id, model.config.eos_token_ids) == (2, (2, second))
    out = hf_io.save(tmp_path / "export", model, params)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, second]
    assert hf_io.load(out, tokenizer=False)[0].config == model.config
    with torch.no_grad():
        stops = greedy(original), greedy(transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert stops[0] == stops[1] == free[:3], stops


def test_generation_config_eos_ids_are_added(saved):
    """Some models list one eos id in config.json and more in generation_config.json (what transformers'
    generate stops at): the loaded config has them all, config.json's first."""
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 9}))
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 9], "temperature": 0.6}))
    assert hf_io.load_config(saved).eos_token_ids == (9, 4)
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert hf_io.load_config(saved).extra_eos_token_ids == ()


def test_bad_eos_ids_are_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, "end"]}))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: eos_token_id: \[2, 'end'\] is not a"):
        hf_io.load_config(saved)
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "generation_config.json").write_text("{not json")
    with pytest.raises(hf_io.CheckpointFormatError, match=r"generation_config\.json: invalid JSON"):
        hf_io.load_config(saved)
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": -1}))
    with pytest.raises(hf_io.CheckpointFormatError, match=r"generation_config\.json: eos_token_id: -1"):
        hf_io.load_config(saved)
