"""Benchmark scripts no other test runs still run: benchmarks/tune_triton.py --smoke takes its
every path (each sweep, the result check, the JSON) on the CPU through Triton's interpreter, so the
script a GPU session relies on cannot rot between GPU sessions; benchmarks/ab_kernels.py --smoke
compares the built extension with itself."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_tune_triton_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "tune_triton.json").read_text())
    sweeps = {row["sweep"].split(":")[1].strip() for row in data["results"]}
    assert sweeps == {"row kernels", "HTA teacher", "BLOCK, NUM_WARPS"}, sweeps
    assert all(row.get("same_result_as_first", True) for row in data["results"]), data["results"]


def test_ab_kernels_smoke(tmp_path):
    """benchmarks/ab_kernels.py, comparing the built extension with itself on its smallest shape:
    the alternating child processes, the aggregation and the result files."""
    import snnkd_fast

    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")
    so = next((ROOT / "snnkd_fast").glob("_C*.so"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_kernels.py"), "--base-so", str(so),
                             "--smoke", "--ops", "losses,neurons", "--name", "ab_smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "ab_smoke.json").read_text())
    assert {row["op"] for row in data["results"]} == {"per_timestep_kl", "tser_loss", "hta_kl", "nld_loss",
                                                      "lif_sigmoid", "lif_atan", "plif_sigmoid"}
    assert all(row["base_fwd_us"] > 0 and row["new_bwd_us"] > 0 for row in data["results"])
    assert (tmp_path / "ab_smoke.csv").exists()
    # plot.py, run over a results folder that holds such a file, skips it (it has no grid to plot)
    plotted = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert plotted.returncode == 0, plotted.stderr[-4000:]
    assert not list(tmp_path.glob("*.png"))
