"""LoRA export: merged weights load in transformers, adapters alone load in PEFT, both with our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models import hf_io
from jaxrlhf.models.lora import LoRAConfig, init_lora, join_params, merge_lora
from jaxrlhf.models.peft_io import CONFIG_FILE, WEIGHTS_FILE, save_peft_adapters
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask

TARGETS = {"gpt2": ("q", "v", "o", "up", "down"), "llama": ("q", "k", "v", "o", "gate", "up", "down")}


@pytest.fixture(params=["per-projection", "fused-qkv"])
def adapted(hf_checkpoint, request):
    """A tiny HF model saved to disk (gpt2, llama, qwen2), loaded here, with random (non-zero) adapters on
    each projection, or one fused q/k/v adapter (written for Llama as q, k and v adapters sharing A)."""
    torch = pytest.importorskip("torch")
    name, path, _ = hf_checkpoint
    loaded = hf_io.load(path, tokenizer=False)
    model, base = loaded[0], loaded[1]
    targets = TARGETS.get(name, TARGETS["llama"]) if request.param == "per-projection" else ("qkv", "o")
    lora = LoRAConfig(enabled=True, rank=3, alpha=6.0, targets=targets)
    model = LanguageModel(model.config, lora_alpha=lora.alpha)
    adapters = init_lora(jax.random.key(1), model.config, lora)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    tokens = np.random.RandomState(0).randint(3, 64, (2, 8))
    mask = np.ones_like(tokens)
    mask = jnp.asarray(mask)
    ours = model.apply(join_params(base, adapters), jnp.asarray(tokens), positions_from_mask(mask), mask)[0]
    return torch, name, path, model, base, adapters, lora, tokens, np.asarray(ours)


def test_merged_export_loads_in_transformers(adapted, tmp_path):
    torch, _, _, model, base, adapters, lora, tokens, ours = adapted
    import transformers

    merged = merge_lora(base, adapters, model.config, lora)
    hf_io.save(tmp_path / "merged", LanguageModel(model.config), merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_peft_adapters_load_onto_the_base(adapted, tmp_path):
    torch, _, base_path, model, _, adapters, lora, tokens, ours = adapted
    import peft
    import transformers

    out = save_peft_adapters(tmp_path / "adapter", model.config, adapters, lora, base_model=str(base_path))
    assert (out / CONFIG_FILE).exists() and (out / WEIGHTS_FILE).exists()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_path, attn_implementation="eager")
    with torch.no_grad():
        plain = hf_base.eval()(torch.tensor(tokens)).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert np.abs(theirs - plain).max() > 1e-3  # the adapters were applied
