"""Compare one build's two paths that an environment setting chooses between: the public losses'
forward+backward (Python wrapper, autograd and kernels: what a training step pays), in fresh
processes with and without the setting, alternating.

Why: some kernel choices are read from the environment once per process -- the CUDA forward that
forms the student's gradient (off under ``SNNKD_CUDA_KD_NO_FORWARD_GRAD=1``), the packed row kernels
and split HTA head (off under ``SNNKD_CUDA_KD_UNPACKED=1``). Their effect on small, host-bound cases
(a launch or a host-side op fewer) shows only in wall time, and a grid from another session cannot
tell it: the GPU machines' hosts differ by more (benchmarks/GPU_NOTES.md, session 18). Both paths in
one session, alternating rounds, each case's best median.

    python benchmarks/ab_env.py --device cuda                                   # the forward's gradient
    python benchmarks/ab_env.py --device cuda --env SNNKD_CUDA_KD_UNPACKED=1 --name ab_env_unpacked
    python benchmarks/ab_env.py --device cpu --smoke                             # a few tiny cases

Writes ``benchmarks/results/<device-slug>/<name>.json`` (and .csv; name ``ab_env`` by default): per
case the median fwd+bwd ms with the setting ("base") and without it ("new"), and base/new; a table on
stdout. Timing as the benchmarks' (``common.Timer``: on a GPU each pass host-inclusive, after the
previous one finished).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

LOSSES = ("per_timestep_kl", "tser_loss", "hta_kl", "kd_kl")
# (T, B, C): the grid's host-bound B=512 cases, its class counts of a vocabulary and its largest rows
SHAPES = {"cuda": [(4, 512, 100), (4, 512, 1000), (16, 512, 1000), (4, 256, 32000), (16, 64, 128000)],
          "cpu": [(4, 64, 100), (4, 64, 1000), (4, 16, 32000)]}
SMOKE_SHAPES = [(2, 3, 40)]
DTYPES = {"cuda": ("float32", "bfloat16"), "cpu": ("float32",)}
DEFAULT_ENV = "SNNKD_CUDA_KD_NO_FORWARD_GRAD=1"


def cases(device: str, smoke: bool) -> list[tuple[str, tuple[int, int, int], str]]:
    shapes = SMOKE_SHAPES if smoke else SHAPES[device]
    losses = LOSSES[:1] if smoke else LOSSES
    return [(loss, shape, dtype) for dtype in DTYPES[device] for loss in losses for shape in shapes]


def measure(device_name: str, smoke: bool, budget_s: float) -> dict[str, float]:
    """{case label: fwd+bwd median ms} in this process (the child)."""
    import torch

    from snnkd_fast import losses

    device = torch.device(device_name)
    timer = common.Timer(device, budget_s=budget_s, warmup_s=budget_s / 4, min_reps=5)
    medians = {}
    for loss, shape, dtype in cases(device_name, smoke):
        generator = torch.Generator(device=device).manual_seed(0)
        teacher = 3 * torch.randn(shape[1:], device=device, generator=generator)
        student = (teacher + 2 * torch.randn(shape, device=device, generator=generator)).to(getattr(torch, dtype))
        teacher = teacher.to(student.dtype)
        fn = getattr(losses, loss)

        def setup(student=student):
            return student.detach().requires_grad_()

        def run(leaf, fn=fn, teacher=teacher):
            fn(leaf, teacher).backward()
            return leaf.grad

        medians[f"{loss} {'x'.join(map(str, shape))} {dtype}"] = timer(run, setup).median_ms
        del student, teacher
    return medians


def run_child(env_setting: str | None, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if env_setting:
        name, _, value = env_setting.partition("=")
        env[name] = value
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "medians.json"
        command = [sys.executable, __file__, "--child", str(out), "--device", args.device,
                   "--budget-s", str(args.budget_s)] + (["--smoke"] if args.smoke else [])
        subprocess.run(command, env=env, check=True)
        return json.loads(out.read_text())


def main(argv=None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--env", default=DEFAULT_ENV,
                        help=f"the setting of the base path, NAME=VALUE (default {DEFAULT_ENV})")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path (default 2)")
    parser.add_argument("--budget-s", type=float, default=0.1, help="seconds of samples per case (default 0.1)")
    parser.add_argument("--smoke", action="store_true", help="one loss, one tiny shape (a test of the script)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--name", default="ab_env", help="output file name, without extension")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.configure_threads()
        args.child.write_text(json.dumps(measure(args.device, args.smoke, args.budget_s)))
        return None
    if "=" not in args.env:
        parser.error("--env takes NAME=VALUE")
    start, device, threads = common.begin_run(args)
    best: dict[str, dict[str, float]] = {"base": {}, "new": {}}
    for round_index in range(args.rounds):
        for path, setting in (("base", args.env), ("new", None)):
            print(f"round {round_index + 1}/{args.rounds}: {path} ({setting or 'as built'})", flush=True)
            for case, ms in run_child(setting, args).items():
                best[path][case] = min(best[path].get(case, float("inf")), ms)
    rows = [{"case": case, "base_ms": best["base"][case], "new_ms": best["new"][case],
             "speedup": best["base"][case] / best["new"][case]} for case in best["new"]]
    meta = common.run_metadata(device, argv or sys.argv[1:], threads, op="ab_env", base_env=args.env,
                               rounds=args.rounds, sample_budget_s=args.budget_s,
                               timing_method="common.Timer: host-inclusive fwd+bwd, best median over rounds")
    meta["wall_s"] = time.perf_counter() - start
    print(f"\n{'case':40s} {'base ms':>9s} {'new ms':>9s} {'base/new':>9s}   (base: {args.env})")
    for row in rows:
        print(f"{row['case']:40s} {row['base_ms']:9.3f} {row['new_ms']:9.3f} {row['speedup']:8.2f}x")
    out_dir = args.out or common.default_out_dir(device)
    path = common.write_result_json(out_dir, device, args.name, meta, rows)
    common.write_csv(path.with_suffix(".csv"), rows, ["case", "base_ms", "new_ms", "speedup"])
    return path


if __name__ == "__main__":
    main()
