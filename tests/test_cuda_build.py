"""The CUDA sources compile (nothing CUDA runs here): the device code of every kernel, for sm_80 and
sm_90, in seconds; the whole extension file (with torch's headers) in the CMake build of CI."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ
                                else None)


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile(tmp_path, arch):
    source = os.path.join(ROOT, "csrc", "tests", "lif_cuda_kernels_check.cu")
    result = subprocess.run(
        [NVCC, "-c", source, "-o", str(tmp_path / "kernels.o"), "-std=c++17", "-O3", f"-arch=sm_{arch}",
         "-I", os.path.join(ROOT, "csrc"), "-Werror", "all-warnings"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
