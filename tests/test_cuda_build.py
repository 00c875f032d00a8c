"""The CUDA sources compile (nothing CUDA runs here): the device code of every kernel, for sm_80 and
sm_90 (seconds for the neurons, about half a minute per arch for the KD losses' 160 instantiations);
the whole extension files (with torch's headers) in the CMake build of CI."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ
                                else None)
# Standalone files that instantiate every kernel of a family without torch headers.
CHECK_FILES = ["lif_cuda_kernels_check.cu", "kd_cuda_kernels_check.cu"]


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("check_file", CHECK_FILES, ids=[f.split("_cuda")[0] for f in CHECK_FILES])
def test_cuda_kernels_compile(tmp_path, check_file, arch):
    source = os.path.join(ROOT, "csrc", "tests", check_file)
    result = subprocess.run(
        [NVCC, "-c", source, "-o", str(tmp_path / "kernels.o"), "-std=c++17", "-O3", f"-arch=sm_{arch}",
         "-I", os.path.join(ROOT, "csrc"), "-Werror", "all-warnings"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
