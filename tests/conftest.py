"""Shared test settings: CPU only, a persistent compilation cache, deterministic keys."""

import os

# Tests run on the CPU; a persistent cache makes the second run of the suite compile far less.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' programs are tiny and compiled once each, so compile time is most of the suite's time (71% of
# the README test's, 99% of tests/experiments/test_pipeline.py's, measured with jax.monitoring). Two XLA CPU
# settings cut it; XLA's HLO passes, which decide the operations, run as always, and only the emission of
# machine code changes (so results can differ from the defaults' by rounding):
# - LLVM at -O0: its -O2 costs more time than it saves on programs this small;
# - fusions emitted by XLA's elemental IR emitter instead of the MLIR fusion emitters, whose pipeline costs
#   about 3x the compile time here (test_pipeline.py: 47 s instead of 77 s from a cold cache).
# Set before the backend starts, and inherited by the subprocess tests (multi-device, multi-process, CLI).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: list[str]) -> bool:
    """Whether this jaxlib's XLA knows ``flags``: it aborts any process whose XLA_FLAGS names one it does
    not have (a later jaxlib may drop one), so a child process tries them first
    (:func:`jaxrlhf.xla_flags.xla_accepts`). The answer is kept per jaxlib version beside the compilation
    cache, so that only the suite's first processes pay the ~2 s."""
    from jaxrlhf.xla_flags import xla_accepts

    return xla_accepts(flags, os.environ["JAX_COMPILATION_CACHE_DIR"])


def _with_test_flags(xla_flags: str) -> str:
    """``xla_flags`` plus each of :data:`TEST_XLA_FLAGS` it does not set itself and XLA accepts."""
    from jaxrlhf.xla_flags import with_flags

    return with_flags(xla_flags, TEST_XLA_FLAGS, _xla_accepts)


# JAXRLHF_TEST_PRODUCT_XLA=1 leaves XLA's settings as a user's run has them: tests/test_product_xla.py runs
# the numerics tests that way too, so that the code users compile is tested as well.
PRODUCT_XLA = os.environ.get("JAXRLHF_TEST_PRODUCT_XLA") == "1"
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # before the test flags are added
if not PRODUCT_XLA:
    os.environ["XLA_FLAGS"] = _with_test_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


# ------------------------------------------------------------------ tiny Hugging Face models (torch)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def suite_conftest(request):
    """This module, as pytest loaded it: for the tests of the suite's own settings."""
    return next(p for p in request.config.pluginmanager.get_plugins()
                if os.path.abspath(getattr(p, "__file__", "") or "") == os.path.abspath(__file__))


VOCAB = 64

TINY_HF_CONFIGS = {
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # GQA (4 query heads, 2 kv heads) and llama3 RoPE scaling that actually rescales at this length.
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    # qkv bias and tied embeddings.
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}


def make_hf_model(name: str, seed: int = 0, scale: float = 4.0):
    """A random torch model of a tiny config, its matrices scaled so that logits are well separated."""
    import torch
    import transformers

    cfg = dict(TINY_HF_CONFIGS[name])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            # Random init is near-uniform over the vocabulary; larger weights make greedy arg-maxes
            # robust to float32 rounding differences between the two implementations.
            if p.ndim == 2 and not any(e in n for e in ("embed", "wte", "wpe")):
                p.mul_(scale)
    return model


@pytest.fixture(scope="session", params=sorted(TINY_HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(name, directory, torch model): a tiny random model written by ``save_pretrained`` (safetensors)."""
    pytest.importorskip("torch")
    name = request.param
    model = make_hf_model(name)
    path = tmp_path_factory.mktemp(f"hf-{name}")
    model.save_pretrained(path, safe_serialization=True)
    return name, path, model


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 9, pads=(0, 3, 5)):
    """Random tokens (ids ≥ 3) with ``pads[i]`` left-padding columns in row i."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for i, p in enumerate(pads[:batch]):
        mask[i, :p] = 0
        tokens[i, :p] = 0
    return tokens, mask


@pytest.fixture(scope="session")
def padded_batch():
    return left_padded_batch


def pytest_collection_modifyitems(config, items):
    """Files holding a test marked ``slow`` (a whole run end to end, seconds to minutes) are collected
    first, each file's tests kept in order: xdist hands out files in collection order, so the long ones
    start at once instead of leaving one worker busy while the other has finished. ``-m "not slow"``
    leaves them out."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group stays
