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
