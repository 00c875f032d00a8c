"""Where a fused op's time goes, kernel by kernel: one fwd+bwd of each loss and neuron case under
``torch.profiler``, each kernel's device time per iteration and its share of the op's.

Why: the benchmarks time whole passes. When a pass misses its roofline, the next change should go
to the kernel that holds the time -- e.g. HTA-KL's CUDA forward at 256x32000 takes 0.86 ms on an
H200 where per-timestep KL's takes 0.145: is it the teacher head (``hta_teacher_kernel``) or the
forward's second pass over the row? The profiler reads the kernels' device time (CUPTI) on any
machine where PyTorch's profiler works (gVisor or Firecracker), no hardware counters needed.

    python benchmarks/kernel_breakdown.py --device cuda            # the GPU cases, cuda and triton
    python benchmarks/kernel_breakdown.py --device cpu --smoke     # tiny CPU cases: each op's aten/C++ ops

Writes ``benchmarks/results/<device-slug>/kernel_breakdown.json`` (one row per case, backend and
kernel: calls and microseconds per iteration, share of the iteration's device time) and prints a
table per case. On the CPU the "kernels" are the profiler's CPU ops (self time): our C++ kernels'
ops and the aten ops around them.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import snnkd_fast  # noqa: E402
from snnkd_fast import losses  # noqa: E402

LOSSES = ("per_timestep_kl", "tser_loss", "hta_kl", "nld_loss", "kd_kl")
# (T, B, C) of the losses and [T, ...] of the neuron layer: the benchmarks' large cases
SHAPES = {"cuda": {"loss": (4, 256, 32000), "lif": (8, 64, 128, 32, 32)},
          "cpu": {"loss": (4, 16, 1000), "lif": (4, 8, 64, 16, 16)}}
SMOKE_SHAPES = {"loss": (2, 3, 40), "lif": (2, 3, 70)}
# (loss, (T, B, C)) beyond the large case, fp32: HTA-KL where its teacher rows are fewer than a GPU's
# multiprocessors (the CUDA head split over 6 blocks per row on an H200 since session 16, one
# 256-thread block per row under SNNKD_CUDA_KD_UNPACKED; behind torch.compile there at 45b47ca)
EXTRA_LOSS_CASES = {"cuda": (("hta_kl", (4, 64, 128000)),), "cpu": ()}
LOSS_KWARGS = {"nld_loss": {"per_timestep": True}}  # as bench_losses measures it
BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


def loss_case(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              backend: str) -> Callable[[], None]:
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = 3 * torch.randn(shape[1:], device=device, generator=generator)
    student = (teacher + 2 * torch.randn(shape, device=device, generator=generator)).to(dtype).requires_grad_()
    teacher = teacher.to(dtype)
    fn = getattr(losses, name)
    kwargs = LOSS_KWARGS.get(name, {})

    def step() -> None:
        student.grad = None
        fn(student, teacher, backend=backend, **kwargs).backward()
    return step


def lif_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, backend: str,
             **lif_kwargs: Any) -> Callable[[], None]:
    x = torch.randn(shape, device=device).add_(0.5).to(dtype).requires_grad_()

    def step() -> None:
        x.grad = None
        snnkd_fast.lif_multistep(x, tau=2.0, backend=backend, **lif_kwargs).sum().backward()
    return step


def kernel_times(step: Callable[[], None], device: torch.device, iterations: int) -> dict[str, list[float]]:
    """{kernel: [calls, microseconds]} per iteration of ``step`` (CUDA kernels, or CPU ops' self time)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # warm-up: JIT compiles, allocator, caches
        step()
    common.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
        common.synchronize(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name][0] += 1
                totals[event.name][1] += event.time_range.elapsed_us()
    else:
        for average in prof.key_averages():
            if average.self_cpu_time_total > 0:
                totals[average.key][0] += average.count
                totals[average.key][1] += average.self_cpu_time_total
    return {name: [calls / iterations, us / iterations] for name, (calls, us) in totals.items()}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one loss and the neuron (a test)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="kernels printed per case (the JSON has all)")
    parser.add_argument("--variant", help="a name for this run's kernels (e.g. 'unpacked' under "
                                          "SNNKD_CUDA_KD_UNPACKED=1): writes kernel_breakdown_<variant>.json")
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES[device.type]
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" and not args.smoke else (torch.float32,)
    cases: list[tuple[str, torch.dtype, Callable[[str], Callable[[], None]]]] = []
    for dtype in dtypes:
        for name in (("hta_kl",) if args.smoke else LOSSES):
            cases.append((f"{name} {'x'.join(map(str, shapes['loss']))}", dtype,
                          lambda backend, name=name, dtype=dtype: loss_case(name, shapes["loss"], dtype, device,
                                                                            backend)))
        cases.append((f"lif_multistep {'x'.join(map(str, shapes['lif']))}", dtype,
                      lambda backend, dtype=dtype: lif_case(shapes["lif"], dtype, device, backend)))
    for name, shape in () if args.smoke else EXTRA_LOSS_CASES[device.type]:
        cases.append((f"{name} {'x'.join(map(str, shape))}", torch.float32,
                      lambda backend, name=name, shape=shape: loss_case(name, shape, torch.float32, device, backend)))
    backends = [name for name in BACKENDS[device.type]
                if snnkd_fast.backends("kd")[name] and snnkd_fast.backends("lif")[name]]
    rows: list[dict[str, Any]] = []
    for label, dtype, make in cases:
        for backend in backends:
            times = kernel_times(make(backend), device, args.iterations)
            total = sum(us for _, us in times.values())
            ranked = sorted(times.items(), key=lambda item: -item[1][1])
            print(f"\n{label} {str(dtype).removeprefix('torch.')} backend={backend}: {total:.1f} us per fwd+bwd "
                  f"({'device' if device.type == 'cuda' else 'CPU self'} time)")
            for name, (calls, us) in ranked[:args.top]:
                print(f"  {us:9.1f} us {100 * us / total if total else 0:5.1f}%  x{calls:g}  {name[:110]}")
            rows += [{"case": label, "dtype": str(dtype).removeprefix("torch."), "backend": backend, "kernel": name,
                      "calls_per_iter": calls, "us_per_iter": us, "share": us / total if total else None}
                     for name, (calls, us) in ranked]
    meta = common.run_metadata(device, sys.argv[1:] if argv is None else argv, torch.get_num_threads(),
                               op="kernel_breakdown", grid="smoke" if args.smoke else "breakdown",
                               iterations=args.iterations, variant=args.variant,
                               cuda_kd_unpacked=os.environ.get("SNNKD_CUDA_KD_UNPACKED"),
                               timing="torch.profiler: CUDA kernels' device time (CUPTI) on a GPU, CPU ops' "
                                      "self time on the CPU; per fwd+bwd iteration after 3 warm-ups")
    name = f"kernel_breakdown_{args.variant}" if args.variant else "kernel_breakdown"
    return common.write_result_json(args.out, device, name, meta, rows)


if __name__ == "__main__":
    main()
