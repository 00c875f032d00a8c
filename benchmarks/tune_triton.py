"""Sweep the Triton kernels' launch shapes on a GPU, with the CUDA kernels as the baseline of the same run.

    python benchmarks/tune_triton.py --out DIR        # GPU only; ~2 minutes on an H100 (JIT compiles)

The first H100 run (benchmarks/results/nvidia-h100-80gb-hbm3/) left these open, each a module
attribute of the Triton backends that this script sets in turn:

* ``snnkd_fast.kd.triton.KD_ROW_WARPS`` (4), ``KD_BLOCK_T`` (16), ``KD_BWD_SPLIT_C`` (True) and
  ``KD_MIN_PROGRAMS_PER_SM`` (4: the forward's tile height shrinks until there are that many programs
  per SM; 0 turns it off): the
  loss row kernels ran one program per sample over a <= 4096-element tile; at [4, 256, 32000] their
  forward reached 15% of the HBM peak (CUDA: 30%). Since then the forward can run one program per
  timestep tile and the backward one per class chunk (the latter on by default).
* ``snnkd_fast.kd.triton.HTA_TEACHER_WARPS`` (8) and ``HTA_SEARCH_BLOCK`` (256): HTA's teacher-side
  head selection, one program per teacher row; its forward took 1.5 ms where KL's took 0.17 ms.
* ``snnkd_fast.lif.triton.BLOCK`` (256) and ``NUM_WARPS`` (4): the neuron kernels, 0.80x
  SpikingJelly's Triton kernel at conv T=8.

Each variant is timed forward and forward+backward after a check that its loss (or spikes) equal the
default variant's: device time (``common.Timer(queued=True)``: CUDA events around back-to-back
launches, L2 flushed before each, as ``triton.testing.do_bench``). The first sweep (4b3fab5, H100)
timed host-inclusive samples like the benchmark grids, and their jitter was larger than most
differences between variants (two variants running the same forward kernel read 0.17 and 0.43 ms). Writes ``tune_triton.json`` (rows
and metadata) to ``--out`` and prints a table per sweep, fastest first.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import common
from common import Timer

LOSS_SHAPES = ((4, 256, 32000), (16, 512, 1000))
HTA_SHAPES = ((4, 256, 32000), (4, 64, 128000))
LIF_SHAPES = ((8, 64, 128, 32, 32), (16, 64, 4096))
SMOKE = False


def time_case(timer: Timer, fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> dict[str, float]:
    timings = common.time_passes_of(timer, fn, leaf)
    return {name: timing.median_ms for name, timing in timings.items() if name in ("fwd", "fwdbwd")}


def sweep(label: str, timer: Timer, module: Any, grid: dict[str, tuple], make: Callable[[], tuple],
          call: Callable[..., torch.Tensor], baseline: Optional[Callable[..., torch.Tensor]]) -> list[dict]:
    """Time ``call(*make())`` for every combination of ``grid`` (module attributes), restoring them."""
    if SMOKE:  # two values per knob: the script's paths, not a tuning
        grid = {name: values[:2] for name, values in grid.items()}
    saved = {name: getattr(module, name) for name in grid}
    rows, reference_value = [], None
    inputs = make()
    try:
        if baseline is not None:
            rows.append({"sweep": label, "variant": "cuda (baseline)",
                         **time_case(timer, lambda leaf: baseline(leaf, *inputs[1:]), inputs[0])})
        for values in itertools.product(*grid.values()):
            variant = dict(zip(grid, values))
            for name, value in variant.items():
                setattr(module, name, value)
            with torch.no_grad():
                value = call(*inputs).float()
            if reference_value is None:
                reference_value = value
            # spikes must be equal; a loss may round differently with another reduction order
            same = bool(torch.allclose(value, reference_value, rtol=1e-5, atol=1e-6))
            timing = time_case(timer, lambda leaf: call(leaf, *inputs[1:]), inputs[0])
            rows.append({"sweep": label, "variant": ", ".join(f"{k}={v}" for k, v in variant.items()),
                         "same_result_as_first": same, **timing})
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    rows.sort(key=lambda row: row["fwdbwd"])
    print(f"\n{label}")
    for row in rows:
        flag = "" if row.get("same_result_as_first", True) else "  !! result differs"
        print(f"  {row['variant']:44s} fwd {row['fwd']:8.3f} ms  fwd+bwd {row['fwdbwd']:8.3f} ms{flag}")
    return rows


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, times nothing useful")
    args = parser.parse_args(argv)
    global LOSS_SHAPES, HTA_SHAPES, LIF_SHAPES, SMOKE
    SMOKE = args.smoke
    if args.smoke:
        LOSS_SHAPES, HTA_SHAPES, LIF_SHAPES = ((2, 3, 40),), ((2, 3, 40),), ((2, 3, 70),)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("tune_triton.py needs a CUDA GPU (it tunes compiled Triton kernels)")
    import snnkd_fast
    import snnkd_fast.kd.triton as kd_triton
    import snnkd_fast.lif.triton as lif_triton
    from snnkd_fast import losses

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = (Timer(device, budget_s=0.0, warmup_s=0.0, min_reps=1, max_reps=1, min_warmup=2) if args.smoke
             else Timer(device, budget_s=0.2, warmup_s=0.05, min_reps=20, queued=True))
    # --smoke runs on CPU tensors, where the CUDA kernels (built on a GPU machine) cannot be the baseline
    cuda_available = bool(snnkd_fast.backends("kd")["cuda"]) and not args.smoke
    lif_cuda_available = bool(snnkd_fast.backends()["cuda"]) and not args.smoke
    rows: list[dict] = []
    generator = torch.Generator(device=device).manual_seed(0)

    def loss_inputs(shape):
        def make():
            teacher = 3 * torch.randn(shape[1:], device=device, generator=generator)
            student = (teacher + 2 * torch.randn(shape, device=device, generator=generator)).requires_grad_()
            return student, teacher
        return make

    for loss in ("per_timestep_kl", "hta_kl"):
        fn = getattr(losses, loss)
        for shape in LOSS_SHAPES:
            rows += sweep(f"{loss} {'x'.join(map(str, shape))} fp32: row kernels", timer, kd_triton,
                          {"KD_ROW_WARPS": (4, 8), "KD_BLOCK_T": (1, 16), "KD_BWD_SPLIT_C": (False, True),
                           "KD_MIN_PROGRAMS_PER_SM": (0, 4)},
                          loss_inputs(shape),
                          lambda s, t, fn=fn: fn(s, t, backend="triton"),
                          (lambda s, t, fn=fn: fn(s, t, backend="cuda")) if cuda_available else None)
    for shape in HTA_SHAPES:
        rows += sweep(f"hta_kl {'x'.join(map(str, shape))} fp32: HTA teacher", timer, kd_triton,
                      {"HTA_TEACHER_WARPS": (4, 8, 16), "HTA_SEARCH_BLOCK": (128, 256, 512)}, loss_inputs(shape),
                      lambda s, t: losses.hta_kl(s, t, backend="triton"),
                      (lambda s, t: losses.hta_kl(s, t, backend="cuda")) if cuda_available else None)
    for shape in LIF_SHAPES:
        def make(shape=shape):
            return (torch.randn(shape, device=device, generator=generator).add_(0.5).requires_grad_(),)
        rows += sweep(f"lif_multistep {'x'.join(map(str, shape))} fp32: BLOCK, NUM_WARPS", timer, lif_triton,
                      {"BLOCK": (128, 256, 512, 1024), "NUM_WARPS": (2, 4, 8)}, make,
                      lambda x: snnkd_fast.lif_multistep(x, backend="triton"),
                      (lambda x: snnkd_fast.lif_multistep(x, backend="cuda")) if lif_cuda_available else None)

    meta = common.run_metadata(device, sys.argv[1:], torch.get_num_threads(), op="tune_triton", grid="sweep",
                               timing="device time: back-to-back launches, CUDA events, L2 flushed (Timer queued)")
    return common.write_result_json(args.out, device, "tune_triton", meta, rows)


if __name__ == "__main__":
    main()
