"""Whether Triton's interpreter (TRITON_INTERPRET=1) can run our kernels in this environment.

Triton's interpreter up to 3.6 (the release torch 2.11 pins) turns a scalar used as a loop bound --
``range(T)`` over a kernel argument, as every one of our kernels does -- into a Python int with
``int(<1-element array>)``, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed in later
Triton). Rather than failing deep inside a launch with "only 0-dimensional arrays can be converted
to Python scalars", the triton backend reports itself unavailable with this module's reason.

Imported only under TRITON_INTERPRET=1 (it imports triton and runs one tiny kernel).
"""
import numpy
import torch
import triton
import triton.language as tl


@triton.jit
def _count_to(out_ptr, n):
    count = 0
    for _ in range(n):
        count += 1
    tl.store(out_ptr, count)


def interpreter_problem() -> str:
    """'' when the interpreter runs a loop bounded by a kernel argument correctly, else why not."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps what failed in its own InterpreterError
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a kernel argument with "
                f"NumPy {numpy.__version__} ({type(error).__name__}: {error}); Triton <= 3.6's interpreter "
                "converts 1-element arrays to ints, which NumPy >= 2.4 refuses (triton-lang/triton#9171): "
                "upgrade triton, or install numpy<2.4")
    if out.item() != 3:
        return f"Triton {triton.__version__}'s interpreter counted a 3-step loop to {out.item()}"
    return ""
