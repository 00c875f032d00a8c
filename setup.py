"""Build snnkd_fast's C++ extension (snnkd_fast._C).

Always builds the CPU kernels (OpenMP through at::parallel_for); adds the CUDA kernels when torch is
a CUDA build and either a GPU is visible or FORCE_CUDA=1 (a build node without a GPU). Install with

    pip install --no-build-isolation -e .

(build isolation would download another torch). The CMake build (CMakeLists.txt) compiles the same
sources standalone, runs the C++ unit test of the shared per-element math and, where nvcc exists,
compiles every .cu file, so a broken CUDA kernel fails CI on a machine without a GPU.
Tuning flags (-march=native, -mprefer-vector-width=512) are probed and dropped where the compiler
rejects them (e.g. aarch64 GCC, older Apple clang); SNNKD_PORTABLE_BUILD=1 leaves them out.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cxx_compiler():
    """The C++ compiler torch's BuildExtension runs (its ninja build, as its ABI check): $CXX, else c++."""
    import shlex

    return shlex.split(os.environ.get("CXX") or "c++")


def supported_compiler_flags(flags, compiler=None):
    """The flags of `flags` that `compiler` (default: _cxx_compiler()) accepts: each is tried alone on
    an empty translation unit, warnings as errors (clang only warns about some unsupported options)."""
    import subprocess
    import tempfile

    compiler = compiler or _cxx_compiler()
    accepted = []
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        for flag in flags:
            try:
                result = subprocess.run(compiler + [flag, "-Werror", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
                ok = result.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                accepted.append(flag)
            else:
                print(f"snnkd_fast setup.py: {' '.join(compiler)} does not accept {flag}; building without it",
                      file=sys.stderr)
    return accepted


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    cpp_sources = [s for s in cpp_sources if not s.startswith("csrc/tests/")]
    cuda_sources = sorted(glob.glob("csrc/*/*.cu"))
    # csrc/tests/*_check.cu only instantiate the device code for tests/test_cuda_build.py.
    cuda_sources = [s for s in cuda_sources if not s.startswith("csrc/tests/")]
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    torch_has_cuda = torch.version.cuda is not None
    if force_cuda and not torch_has_cuda:
        raise RuntimeError(
            "FORCE_CUDA=1 but this torch is a CPU build (torch.version.cuda is None): the CUDA kernels "
            "need a CUDA build of torch. `cmake -S . -B build` still compiles the .cu files for checking.")
    use_cuda = torch_has_cuda and CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)

    # -ffp-contract=off: the charge must round like torch's eager ops (see csrc/lif/lif_math.h).
    # -fno-math-errno -fno-trapping-math: change no result (errno and FP exception flags are never
    # read), but let the compiler if-convert and vectorize loops with sqrt and comparisons.
    # -march=native: the extension is always compiled on the machine that runs it (pip install from
    # source), so the CPU kernels' vectorized loops use its full vector width (AVX2/AVX-512);
    # SNNKD_PORTABLE_BUILD=1 targets baseline x86-64/aarch64 instead (e.g. to build a wheel).
    # -mprefer-vector-width=512: GCC defaults to 256-bit vectors even on AVX-512 CPUs; the exp-bound
    # loss loops and the neuron loops measured ~20% faster with 512 (no effect without AVX-512).
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("SNNKD_PORTABLE_BUILD", "0") != "1":
        # Tuning flags only: each is kept if this compiler accepts it for this target (GCC on aarch64
        # rejects -mprefer-vector-width, an x86 option; older Apple clang rejects -march=native), so
        # the build never fails for want of one -- the kernels have scalar paths for every CPU.
        cxx_flags += supported_compiler_flags(["-march=native", "-mprefer-vector-width=512"])
    # OpenMP: at::parallel_for is a header template that runs sequentially unless the extension is
    # compiled with -fopenmp. The libgomp.so.1 torch already loaded is then the one used, so
    # torch.set_num_threads governs our kernels too.
    link_args = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("snnkd_fast._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                              extra_compile_args=extra_compile_args, extra_link_args=link_args,
                              define_macros=define_macros, py_limited_api=True)]
    return [CppExtension("snnkd_fast._C", cpp_sources, include_dirs=include_dirs,
                         extra_compile_args=extra_compile_args, extra_link_args=link_args,
                         define_macros=define_macros, py_limited_api=True)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers
    setup(
        name="snnkd_fast",
        version="0.1.0",
        description="Fused GPU/CPU kernels for training spiking neural networks by knowledge distillation",
        packages=find_packages(include=["snnkd_fast", "snnkd_fast.*"]),
        python_requires=">=3.9",
        # torch is deliberately not pinned: the GPU machines bring their own CUDA build.
        install_requires=["torch>=2.4", "numpy"],
        extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "spikingjelly==2.0.0"]},
        ext_modules=_extensions(),
        cmdclass=_cmdclass(),
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
