"""benchmarks/bench_gpu.py off the GPU: its arithmetic, and every step rehearsed on the CPU
(``--device cpu``), so the script a GPU machine runs has run here too."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spans, busy", [
    ([], 0.0),
    ([(0.0, 1.0), (2.0, 3.0)], 2.0),  # apart
    ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # two streams overlapping count once
    ([(1.0, 1.5), (0.0, 4.0), (2.0, 3.0)], 4.0),  # inside another, any order
    ([(0.0, 1.0), (1.0, 2.0)], 2.0),  # touching
])
def test_busy_seconds_is_the_union_of_the_calls(spans, busy):
    assert load_bench().busy_seconds(spans) == pytest.approx(busy)


def test_the_gpu_bench_rehearsed_on_the_cpu_measures_every_step(tmp_path):
    results = BENCH.parent / "results" / "bench_gpu.json"
    before = results.read_bytes() if results.exists() else None
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--size", "512",
                           "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["device"] == "cpu" and out["decode_mp_per_s"] > 0
    assert 0 < out["end_to_end"]["busy_fraction"] <= 1
    assert out["end_to_end"]["steady_mp_per_s"] > 0
    errors = out["max_error_vs_whole_image"]
    assert errors["fp32"] <= 1e-5  # the whole image scaled by the model's own mean/std
    assert 0 < errors["bf16"] < 0.05 and 0 < errors["fp16"] < 0.05
    for per_gpu in (1, 2):
        assert out[f"processes_per_gpu_{per_gpu}"]["steady_mp_per_s"] > 0
    assert (results.read_bytes() if results.exists() else None) == before  # not GPU figures
