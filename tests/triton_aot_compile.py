"""Compile every Triton kernel of snnkd_fast for a real GPU target, on a machine without a GPU.

Run as a script in a fresh process (tests/test_triton_kernels_compile.py does): TRITON_INTERPRET must be
unset when triton is first imported, so the kernels are real ``JITFunction`` objects and not the
interpreter's. A stand-in driver reports the target (default sm_90, ``--arch``), and every launch is
turned into Triton's ``warmup`` (compile, do not launch), so the public ops run end to end on CPU
tensors — forward and backward, across the specializations the tests use — and each kernel goes
through Triton's whole pipeline down to ptxas's cubin. The outputs are never read.

The interpreter the CPU tests use checks the kernels' arithmetic, not that they compile: a kernel
that the GPU compiler rejects (an unsupported op, a type error in a branch the interpreter never
took, too many registers) would otherwise first fail on a GPU machine.

Prints one line per compiled kernel specialization and exits 1 on the first compile error.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """The part of Triton's active-driver interface that compiling (not launching) uses."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list[str] = []
RESOURCES = False  # --resources: registers and spill stack of each cubin (cuobjdump -res-usage)


def resource_usage(kernel) -> str:
    """'REG:n STACK:n SHARED:n ...' of a compiled kernel's cubin, read by cuobjdump (no GPU needed)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        return "(cuobjdump not found)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG:" in line)


def compile_only(run):
    def run_as_warmup(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        line = f"{self.fn.__name__} {sorted(kwargs.items())}"
        if RESOURCES and line not in COMPILED:
            line += "  " + resource_usage(kernel)
        COMPILED.append(line)
        return kernel
    return run_as_warmup


def exercise_ops() -> None:
    """Every public op with backend='triton', forward and backward, over its specializations."""
    import snnkd_fast
    from snnkd_fast import losses

    shapes = [(3, 5, 7), (2, 3, 5000)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            student = torch.randn(shape, dtype=dtype, requires_grad=True)
            teacher = torch.randn(shape[1:], dtype=dtype, requires_grad=True)
            teacher_seq = torch.randn(shape, dtype=dtype, requires_grad=True)
            for t in (teacher, teacher_seq):
                for loss in (losses.per_timestep_kl(student, t, backend="triton"),
                             losses.kd_kl(student, t, backend="triton"),
                             losses.tser_loss(student, t, backend="triton"),
                             losses.hta_kl(student, t, backend="triton"),
                             losses.nld_loss(student, t, backend="triton", seed=1),
                             losses.per_timestep_kl(student, t, backend="triton", reduction="none").sum()):
                    loss.backward()
    # A row too long for one tile: the streaming paths.
    student = torch.randn(2, 2, 70000, requires_grad=True)
    teacher = torch.randn(2, 70000, requires_grad=True)
    for fn in (losses.per_timestep_kl, losses.tser_loss, losses.hta_kl, losses.kd_kl):
        fn(student, teacher, backend="triton").backward()
    losses.nld_loss(student, teacher, backend="triton", seed=1).backward()

    from snnkd_fast.lif.surrogates import SURROGATES

    def neurons(dtype, surrogate, **modes):
        x = torch.randn(4, 3, 33, dtype=dtype, requires_grad=True)
        v0 = torch.randn(3, 33, dtype=dtype, requires_grad=True)
        s, v = snnkd_fast.lif_multistep(x, v0, surrogate=surrogate, backend="triton", return_v=True, **modes)
        (s.sum() + v.sum()).backward()
        w = torch.tensor(0.3, requires_grad=True)
        snnkd_fast.plif_multistep(x, w, surrogate=surrogate, backend="triton", **modes).sum().backward()
        modes.pop("decay_input")
        snnkd_fast.if_multistep(x, surrogate=surrogate, backend="triton", **modes).sum().backward()

    # Every surrogate in every mode in float32; the half types (only the loads and stores differ) in one.
    for surrogate in (spec.name for spec in SURROGATES):
        for v_reset in (0.0, None):
            for detach_reset in (False, True):
                for decay_input in (True, False):
                    neurons(torch.float32, surrogate, v_reset=v_reset, detach_reset=detach_reset,
                            decay_input=decay_input)
    for dtype in (torch.bfloat16, torch.float16):
        neurons(dtype, "sigmoid", v_reset=0.0, detach_reset=False, decay_input=True)
    x = torch.randn(4, 3, 33, requires_grad=True)
    snnkd_fast.lif_multistep(x, backend="triton", backward="rate").sum().backward()
    # v_init None: one value for every neuron (the kernels' v_init_stride 0)
    snnkd_fast.lif_multistep(x, backend="triton").sum().backward()
    snnkd_fast.plif_multistep(x, torch.tensor(0.3, requires_grad=True), backend="triton").sum().backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--resources", action="store_true",
                        help="print each specialization's registers and spill stack (cuobjdump -res-usage)")
    parser.add_argument("-k", dest="only", help="only the kernels whose name contains this")
    args = parser.parse_args()
    global RESOURCES
    RESOURCES = args.resources
    triton_driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    JITFunction.run = compile_only(JITFunction.run)
    # The dispatch layer allows Triton on CPU tensors only while interpreting; here it compiles only.
    import snnkd_fast._backends as backends

    backends.triton_takes_cpu_tensors = lambda: True
    for status in backends._STATUS.values():
        status["triton"] = backends.BackendStatus(True)
    exercise_ops()
    for line in dict.fromkeys(COMPILED):
        if args.only is None or args.only in line.split()[0]:
            print(line)
    print(f"compiled {len(set(COMPILED))} kernel specializations for sm_{args.arch} with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
