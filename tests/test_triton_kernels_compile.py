"""Every Triton kernel compiles for a real GPU (sm_90, down to ptxas's cubin) without one.

The CPU suite runs the Triton kernels through the interpreter, which checks their arithmetic but not
that the GPU compiler accepts them; tests/triton_aot_compile.py compiles each specialization the
public ops launch, in a subprocess (TRITON_INTERPRET must be unset there before triton is imported).
The counterpart of tests/test_cuda_build.py for the .cu files. Named *kernels_compile* so that
benchmarks/run_gpu.sh, which runs the kernels themselves, skips it.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_aot_compile.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, f"a Triton kernel failed to compile for sm_90:\n{result.stderr[-6000:]}"
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("compiled ") and int(last.split()[1]) >= 100, result.stdout[-2000:]
