"""The pure parts of the benchmark scripts (their timed runs are the benchmarks themselves, not tests)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xla_cpu_flags_variants_and_summary():
    m = load("xla_cpu_flags")
    assert m.parse_variant("eigen=--xla_cpu_use_xnnpack=false") == ("eigen", "--xla_cpu_use_xnnpack=false")
    assert m.parse_variant("plain=") == ("plain", "")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FLAGS"):
        m.parse_variant("--xla_cpu_use_xnnpack=false")  # flags without a name
    runs = [{"iteration_mfu": mfu, "wall_s": {"update": u, "total": t}, "compile_s": {"total": 10.0},
             "matmul_peak_tflops_per_device": 0.4} for mfu, u, t in ((0.4, 2.0, 4.0), (0.5, 1.0, 3.0),
                                                                     (0.3, 3.0, 5.0))]
    s = m.summarise(runs)
    assert s["iteration_mfu"] == {"median": 0.4, "min": 0.3, "max": 0.5}
    assert s["wall_s"]["total"] == {"median": 4.0, "min": 3.0, "max": 5.0}
    assert s["wall_s"]["update"]["median"] == 2.0 and s["matmul_peak_tflops"]["median"] == 0.4


def test_compile_depth_lists_the_slices_a_rolled_decode_loop_copies():
    m = load("compile_depth")
    assert m.decode_loop_copies(2, "default") == []  # one buffer per layer: read in place
    scanned = m.decode_loop_copies(2, "scan")
    # XLA's CPU matmuls read each layer's weight and cache slice from a copy of it
    assert scanned and all("dynamic_slice" in c for c in scanned)
    assert any("f32[128,512]" in c for c in scanned) and any("f32[8,4,32,64]" in c for c in scanned)


def test_generation_bandwidth_probes_count_the_bytes_they_move():
    m = load("generation")
    copy, read = m.copy_bandwidth(1 << 20, repeats=3), m.read_bandwidth(1 << 20, repeats=3)
    for probe in (copy, read):
        assert 0 < probe["bytes_per_s"] <= probe["best_bytes_per_s"]
    assert "(read + write) / time" in copy["probe"] and "bytes read / time" in read["probe"]
    # the decode step's bytes: every matmul weight once plus the cache at the mean context
    from jaxrlhf.models.config import gpt2_config
    cfg = gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
    need = m.decode_bytes_per_step(cfg, batch=2, prompt=4, new=4)
    assert need["total"] == need["weights"] + need["kv_cache_mean_context"]
    assert need["kv_cache_full_length"] == 2 * 2 * 2 * 8 * 32 * 4  # K and V, layers, batch, 8 columns, d, f32


def test_ppo_iteration_necessary_flops_by_hand_and_beside_generation_benchmark():
    """Matmul FLOPs counted by hand: 2·N_blocks per token, causal attention 4·L·d per attended position, the
    LM head (2·V·d) on response tokens only (the update's MFU counted it on prompt tokens too: +15%)."""
    from jaxrlhf.models.config import gpt2_config

    m, g = load("ppo_iteration"), load("generation")
    cfg = gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
    nb, head = 2 * cfg.num_params(include_embeddings=False), 2 * 64 * 32

    def att(a, b):  # tokens at positions a+1..b, each attending to itself and what precedes it
        return 4 * 2 * 32 * sum(range(a + 1, b + 1))

    got = m.necessary_flops(cfg, prompts=2, rows=4, prompt=3, response=2, epochs=2, separate_critic=False)
    generation = 2 * (3 * nb + att(0, 3)) + 4 * (2 * nb + att(3, 5) + 2 * head)
    forward = 4 * (5 * nb + att(0, 5))
    assert got["generation"] == pytest.approx(generation, rel=1e-12)
    assert got["score"] == pytest.approx(2 * forward + 4 * 2 * head, rel=1e-12)  # reward model, reference
    assert got["update"] == pytest.approx(3 * 2 * (forward + 4 * 2 * head), rel=1e-12)
    assert got["total"] == pytest.approx(got["generation"] + got["score"] + got["update"], rel=1e-12)
    critic = m.necessary_flops(cfg, 2, 4, 3, 2, 2, separate_critic=True)
    assert critic["update"] - got["update"] == pytest.approx(3 * 2 * forward, rel=1e-12)
    # generation.py never feeds the last sampled token back: one token's blocks and attention fewer per row
    ungrouped = m.necessary_flops(cfg, 4, 4, prompt=3, response=2, epochs=1, separate_critic=False)
    assert ungrouped["generation"] - g.generation_flops(cfg, 4, 3, 2) == pytest.approx(4 * (nb + att(4, 5)))


def test_grpo_vs_ppo_divides_every_variant_by_one_probe():
    m = load("grpo_vs_ppo")
    run = {"necessary_tflops": {"update": 6.0}, "wall_s": {"update": 3.0}, "backend": "cpu", "devices": 8}
    assert m.update_mfu(run, 4.0) == 0.5  # simulated CPU devices: the probe already measured the machine
    assert m.update_mfu({**run, "backend": "gpu"}, 4.0) == 0.5 / 8
