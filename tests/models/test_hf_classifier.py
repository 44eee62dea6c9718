"""Reward models and critics as Hugging Face sequence classifiers: exports that ``transformers`` loads and
scores identically, TRL-style checkpoints that jaxrlhf loads, the pad token HF needs, and bad files."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from jaxrlhf.data.toy_tokenizer import make_char_tokenizer
from jaxrlhf.models import hf_io
from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.heads import init_reward_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.scoring import sequence_scores

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS, EOS, UNK = 64, 0, 1, 2, 3
_SHAPE = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
_LLAMA_SHAPE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# One tiny random model per family that jaxrlhf reads, each with what makes it differ from the others.
FAMILIES = {
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, **_SHAPE),
    "llama": dict(model_type="llama", tie_word_embeddings=False, **_LLAMA_SHAPE, **_SHAPE),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **_LLAMA_SHAPE, **_SHAPE),
    "mistral": dict(
        model_type="mistral", sliding_window=6, tie_word_embeddings=False, **_LLAMA_SHAPE, **_SHAPE
    ),
}


def _hf_config(family: str, **extra):
    cfg = dict(FAMILIES[family], **extra)
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _scaled(model, seed: int):
    """Random weights scaled up (as in tests/conftest.py) so that hidden states are far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02 if ("embed" in name or "wte" in name or "wpe" in name) else 0.3)
            if "norm" in name or "ln_" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def causal_dir(request, tmp_path_factory):
    """(family, directory): a random causal LM written by ``transformers.save_pretrained``."""
    family = request.param
    model = _scaled(transformers.AutoModelForCausalLM.from_config(_hf_config(family)), seed=1)
    path = tmp_path_factory.mktemp(f"causal-{family}")
    model.save_pretrained(path)
    return family, path


def _batch(padding: str, pad_id: int, seed: int = 0):
    """Rows of random real tokens, each ending in eos, padded with ``pad_id`` on the ``padding`` side."""
    rng = np.random.RandomState(seed)
    lengths, width = (9, 4, 6), 9
    tokens = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        row = [*rng.randint(4, VOCAB, size=n - 1), EOS]
        cols = slice(0, n) if padding == "right" else slice(width - n, width)
        tokens[i, cols], mask[i, cols] = row, 1
    return tokens, mask


def _hf_scores(model, tokens, mask, family: str, padding: str) -> np.ndarray:
    """HF's pooled score as a user gets it: input ids and attention mask; GPT-2's learned positions need
    explicit position ids under left padding (HF's generate passes them the same way)."""
    kwargs = dict(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    if family == "gpt2" and padding == "left":
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0), dtype=torch.long)
    with torch.no_grad():
        logits = model(**kwargs).logits.numpy()
    assert logits.shape == (len(tokens), 1)
    return logits[:, 0]


def _ours(model, params, head, tokens, mask) -> np.ndarray:
    return np.asarray(sequence_scores(model, params, head, tokens, mask))


def _classifier(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def _head(seed: int, d: int = 32, bias: float = 0.0):
    head = init_reward_head(jax.random.key(seed), d)
    return {"proj": {"kernel": np.asarray(head["proj"]["kernel"]), "bias": np.asarray([bias], np.float32)}}


@pytest.mark.parametrize("padding", ["right", "left"])
def test_reward_model_export_scores_the_same_in_transformers(causal_dir, tmp_path, padding):
    family, path = causal_dir
    model, params, _ = hf_io.load(path)
    head = _head(seed=3)
    tokenizer = make_char_tokenizer("abcdefghijklmnopqrstuvwxyz")
    out = hf_io.save(tmp_path / "rm", model, params, tokenizer=tokenizer, heads={"reward_head": head})

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"][0].endswith("ForSequenceClassification")
    assert hf_config["pad_token_id"] == PAD and len(hf_config["id2label"]) == 1
    classifier = _classifier(out)
    assert classifier.config.num_labels == 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.pad_token_id == classifier.config.pad_token_id == PAD

    tokens, mask = _batch(padding, hf_tok.pad_token_id)
    theirs = _hf_scores(classifier, tokens, mask, family, padding)
    ours = _ours(model, params, head, tokens, mask)
    assert np.abs(theirs - ours).max() <= 1e-5, (theirs, ours)
    assert np.std(ours) > 0.05  # the rows' scores differ, so the token each reads matters

    # jaxrlhf reads the export back as the same reward model.
    model2, params2, _ = hf_io.load(out)
    heads2 = hf_io.load_heads(out)
    assert set(heads2) == {"reward_head"}
    np.testing.assert_allclose(_ours(model2, params2, heads2["reward_head"], tokens, mask), ours, atol=1e-6)


def test_critic_export_and_a_head_bias(causal_dir, tmp_path):
    """A value head (with the bias critics learn) exported as the score. GPT-2: the bias is folded into the
    final LayerNorm's bias and HF gives jaxrlhf's values. RMSNorm models: HF gives h·w, i.e. jaxrlhf's value
    minus the bias, which config.json keeps and jaxrlhf restores."""
    family, path = causal_dir
    model, params, _ = hf_io.load(path)
    value_head, b = _head(seed=4, bias=0.75), 0.75
    tokenizer = make_char_tokenizer("abc")
    out = hf_io.save(
        tmp_path / "critic",
        model,
        params,
        tokenizer=tokenizer,
        heads={"value_head": value_head},
        score_head="value_head",
    )
    folds = family == "gpt2"  # a LayerNorm with a bias; the RMSNorm families have none
    kept = 0.0 if folds else b
    assert json.loads((out / "config.json").read_text())[hf_io.SCORE_METADATA] == {
        "head": "value_head",
        "bias": kept,
    }
    tokens, mask = _batch("right", PAD, seed=1)
    theirs = _hf_scores(_classifier(out), tokens, mask, family, "right")
    ours = _ours(model, params, value_head, tokens, mask)
    assert np.abs(theirs - (ours - kept)).max() <= 1e-5

    heads = hf_io.load_heads(out)
    assert set(heads) == {"value_head"} and float(heads["value_head"]["proj"]["bias"][0]) == kept
    model2, params2, _ = hf_io.load(out)
    np.testing.assert_allclose(_ours(model2, params2, heads["value_head"], tokens, mask), ours, atol=1e-6)


def test_trl_style_sequence_classifier_loads_as_a_reward_model(causal_dir, tmp_path):
    """A ``*ForSequenceClassification`` checkpoint written by transformers (what TRL's RewardTrainer saves):
    jaxrlhf reads its backbone and ``score.weight`` and scores as transformers does."""
    family, _ = causal_dir
    config = _hf_config(family, num_labels=1)
    hf_model = _scaled(transformers.AutoModelForSequenceClassification.from_config(config), seed=5)
    hf_model.save_pretrained(tmp_path / "trl")
    model, params, _ = hf_io.load(tmp_path / "trl")
    heads = hf_io.load_heads(tmp_path / "trl")
    assert set(heads) == {"reward_head"} and float(heads["reward_head"]["proj"]["bias"][0]) == 0.0
    for padding in ("right", "left"):
        tokens, mask = _batch(padding, PAD, seed=2)
        theirs = _hf_scores(hf_model, tokens, mask, family, padding)
        assert np.abs(theirs - _ours(model, params, heads["reward_head"], tokens, mask)).max() <= 1e-5


def test_older_reward_exports_still_load(tmp_path):
    """The earlier layout: a causal LM plus the head in jaxrlhf_heads.safetensors."""
    model = LanguageModel(
        gpt2_config(
            vocab_size=48,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            max_position_embeddings=16,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    params, head = model.init(jax.random.key(0)), _head(seed=1, bias=0.5)
    out = hf_io.save(tmp_path / "old", model, params, heads={"reward_head": head}, score_head=None)
    assert (out / hf_io.HEADS_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    loaded = hf_io.load_heads(out)["reward_head"]
    np.testing.assert_array_equal(loaded["proj"]["kernel"], head["proj"]["kernel"])
    np.testing.assert_array_equal(loaded["proj"]["bias"], head["proj"]["bias"])


def test_untied_export_drops_the_lm_head_and_loads_tied(causal_dir, tmp_path):
    _, path = causal_dir
    model, params, _ = hf_io.load(path)
    out = hf_io.save(tmp_path / "rm", model, params, heads={"reward_head": _head(seed=2)})
    names = set(hf_io.read_safetensors([out / hf_io.SINGLE_FILE]))
    assert "lm_head.weight" not in names and hf_io.SCORE_TENSOR in names
    model2, params2, _ = hf_io.load(out)
    assert model2.config.tie_word_embeddings and "lm_head" not in params2


def _word_tokenizer(specials: list[str], **named) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is ``specials`` then a, b, c (no pad token unless named)."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate([*specials, "a", "b", "c"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=named.get("unk_token", specials[0])))
    backend.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **named)


def test_pad_token_for_classifiers():
    cfg = gpt2_config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, eos_token_id=EOS)
    tok = make_char_tokenizer("ab")
    assert hf_io.classifier_pad_token(tok, cfg) == hf_io.ClassifierPad(PAD, None, True)
    tok.pad_token = "</s>"  # pads with eos: a special token named like a pad takes its place
    assert hf_io.classifier_pad_token(tok, cfg) == hf_io.ClassifierPad(PAD, "<pad>", True)

    # Llama-2 style (<unk>, <s>, </s>; no pad): unk; Llama-3.1 style: its reserved pad token first.
    llama2 = _word_tokenizer(["<unk>", "<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    llama2_cfg = gpt2_config(vocab_size=8, hidden_size=32, num_layers=1, num_heads=4, eos_token_id=2)
    assert hf_io.classifier_pad_token(llama2, llama2_cfg) == hf_io.ClassifierPad(0, "<unk>", True)
    llama3 = _word_tokenizer(["<s>", "</s>", "<|finetune_right_pad_id|>"], bos_token="<s>", eos_token="</s>")
    assert hf_io.classifier_pad_token(llama3, llama2_cfg) == hf_io.ClassifierPad(
        2, "<|finetune_right_pad_id|>", True
    )
    only_bos = _word_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>", pad_token="</s>")
    assert hf_io.classifier_pad_token(only_bos, llama2_cfg) == hf_io.ClassifierPad(0, "<s>", True)

    # Without a tokenizer: the config's ids.
    assert hf_io.classifier_pad_token(None, cfg) == hf_io.ClassifierPad(EOS, None, False)
    assert hf_io.classifier_pad_token(None, gpt2_config(eos_token_id=2, pad_token_id=0)).id == 0


def test_export_with_only_eos_to_pad_warns(tmp_path, caplog):
    """GPT-2's tokenizer has one special token: HF then cannot tell pads from a final eos; say so."""
    tok = _word_tokenizer(["</s>"], eos_token="</s>", pad_token="</s>", bos_token="</s>", unk_token="</s>")
    model = LanguageModel(
        gpt2_config(vocab_size=16, hidden_size=32, num_layers=1, num_heads=4, eos_token_id=2)
    )
    with caplog.at_level(logging.WARNING, logger="jaxrlhf"):
        out = hf_io.save(
            tmp_path / "rm",
            model,
            model.init(jax.random.key(0)),
            tokenizer=tok,
            heads={"reward_head": _head(seed=0)},
        )
    assert "pad token distinct from eos" in caplog.text
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tok.eos_token_id == 0


def test_multi_label_classifier_is_refused(tmp_path):
    config = _hf_config("gpt2", num_labels=3)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "cls")
    hf_io.load(tmp_path / "cls")  # the backbone is fine
    with pytest.raises(hf_io.CheckpointFormatError, match=r"score\.weight has shape \(3, 32\).*num_labels 1"):
        hf_io.load_heads(tmp_path / "cls")


# ------------------------------------------------------------------------------------- corrupt files


@pytest.fixture
def exported(tmp_path):
    model = LanguageModel(
        gpt2_config(
            vocab_size=48,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            max_position_embeddings=16,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    return hf_io.save(
        tmp_path / "m", model, model.init(jax.random.key(0)), heads={"value_head": _head(0)}, score_head=None
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("name", [hf_io.SINGLE_FILE, hf_io.HEADS_FILE])
def test_corrupt_safetensors_is_one_line_naming_the_file(exported, damage, name):
    f = exported / name
    raw = f.read_bytes()
    f.write_bytes(
        {"truncated": raw[: len(raw) // 2], "garbage": b"not a tensor file " * 40, "empty": b""}[damage]
    )
    with pytest.raises(hf_io.CheckpointFormatError) as info:
        hf_io.load(exported) if name == hf_io.SINGLE_FILE else hf_io.load_heads(exported)
    message = str(info.value)
    assert message.startswith(f"{f}: not a readable safetensors file, truncated or corrupt")
    assert "\n" not in message


def test_invalid_config_json_is_one_line(exported):
    (exported / "config.json").write_text("{not json")
    with pytest.raises(hf_io.CheckpointFormatError, match=r"config\.json: invalid JSON"):
        hf_io.load(exported)
    (exported / "config.json").write_text("[1, 2]")
    with pytest.raises(hf_io.CheckpointFormatError, match=r"config\.json: expected a JSON object, got list"):
        hf_io.load(exported)


# ------------------------------------------------------------------------------- tokenizer vs model


def test_check_vocabulary_names_both_sizes():
    small = gpt2_config(vocab_size=16, hidden_size=32, num_layers=1, num_heads=4)
    tok = make_char_tokenizer("abcdefghij")  # 18 tokens, ids 0..17
    with pytest.raises(hf_io.VocabularyMismatchError) as info:
        hf_io.check_vocabulary(tok, small, tokenizer_source="tok/", model_source="model/")
    assert str(info.value).startswith(
        "the tokenizer tok/ has 18 tokens (ids up to 17) but the model model/ has vocab_size 16: "
        "ids >= 16 have no embedding"
    )
    hf_io.check_vocabulary(tok, gpt2_config(vocab_size=18, hidden_size=32, num_layers=1, num_heads=4))
    hf_io.check_vocabulary(tok, gpt2_config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4))
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})  # id 18: no longer fits 18
    with pytest.raises(hf_io.VocabularyMismatchError, match=r"19 tokens \(ids up to 18\) but the model has"):
        hf_io.check_vocabulary(tok, gpt2_config(vocab_size=18, hidden_size=32, num_layers=1, num_heads=4))
