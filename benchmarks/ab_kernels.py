"""Compare two builds of the C++ extension kernel by kernel: the CPU KD-loss ops (forward and
backward of per-timestep KL, TSER, HTA-KL, NLD) and the CPU neuron ops (LIF with the sigmoid and
atan surrogates, PLIF with its decay gradient) of a base commit against the working tree's build.

Why: on a shared VM a whole benchmark grid run today and one run last week can differ by more than
a kernel change does -- eager PyTorch and our kernels do not slow down alike when the machine is
busy, so even the same-run ratios of an unchanged kernel move between runs (we measured LIF's quick
grid at 4.8-6.2x SpikingJelly and, with no code change, 5.6-8.0x on another day). Alternating the two
builds in fresh processes, several rounds each, and keeping each case's best median compares them
under the same conditions. The ops are timed directly (no Python wrapper, no autograd): what a
kernel change changes.

    python benchmarks/ab_kernels.py --base 69bcfac            # builds the base in a git worktree
    python benchmarks/ab_kernels.py --base-so /path/to/_C.so  # or any built extension
    python benchmarks/ab_kernels.py --base HEAD --ops neurons --name ab_neurons

Writes benchmarks/results/<device-slug>/<name>.json (and .csv; name "ab_kernels" by default): per
case the base and the new median in us, and new/base speed-ups; a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

REPO_ROOT = HERE.parent
# (T, B, C): SNN class counts (CIFAR-10/100, ImageNet) and a vocabulary-sized row
SHAPES = [(4, 128, 10), (16, 128, 10), (16, 128, 100), (4, 128, 1000), (4, 16, 32000)]
LOSSES = {"per_timestep_kl": 0, "tser_loss": 1, "hta_kl": 2}
# (T, one step's shape): the quick grid's layers (bench_lif.py), the full CPU grid's conv layer at
# T=16 (33 MB per tensor) and an ImageNet-sized conv map
NEURON_SHAPES = [(4, (8, 64, 16, 16)), (8, (8, 64, 16, 16)), (16, (8, 64, 16, 16)), (8, (32, 4096)),
                 (16, (32, 64, 16, 16)), (4, (64, 128, 16, 16))]
# name: (neuron kind, surrogate id, decay gradient) -- ids of snnkd_fast/lif/params.py and surrogates.py
NEURONS = {"lif_sigmoid": (1, 0, False), "lif_atan": (1, 1, False), "plif_sigmoid": (2, 0, True)}
OP_FAMILIES = ("losses", "neurons")


def _median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def measure_neurons(ops, reps: int, shapes) -> dict[str, list[float]]:
    """{case: [forward us, backward us]} of the neuron ops, BPTT mode, float32."""
    import torch

    out = {}
    for T, step in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, *step, generator=gen) * 1.5 + 0.5  # a fifth to a third of the neurons fire
        v_init, grad_spikes = torch.zeros(step), torch.randn(T, *step, generator=gen)
        for name, (neuron, surrogate, decay_grad) in NEURONS.items():
            decay = torch.tensor(0.5) if neuron == 2 else None
            # tau 2, decay_input, v_threshold 1, hard reset to 0, no detach_reset, alpha (SJ's defaults)
            args = (neuron, 2.0, True, 1.0, 0.0, False, False, surrogate, 4.0 if surrogate == 0 else 2.0)

            def forward():
                return ops.lif_forward(x, v_init, decay, *args)

            h_seq = forward()[2]
            out[f"{name} {T}x{'x'.join(map(str, step))}"] = [_median_us(forward, reps), _median_us(
                lambda: ops.lif_backward(grad_spikes, None, h_seq, v_init, decay, torch.float32, *args, decay_grad),
                reps)]
    return out


def measure_losses(ops, reps: int, shapes) -> dict[str, list[float]]:
    """{case: [forward us, backward us]} of the KD-loss row ops, float32."""
    import torch

    out = {}
    seed = torch.tensor([1234], dtype=torch.int64)
    for T, B, C in shapes:
        gen = torch.Generator().manual_seed(0)
        student, teacher = torch.randn(T, B, C, generator=gen), torch.randn(B, C, generator=gen)
        for name, loss_id in LOSSES.items():
            args = (loss_id, 4.0, 4.0, 0.1)

            def forward():
                return ops.kd_rows_forward(student, teacher, *args, 0.5)

            rows, stats, keys = forward()
            grad = torch.ones_like(rows)
            out[f"{name} {T}x{B}x{C}"] = [_median_us(forward, reps), _median_us(
                lambda: ops.kd_rows_backward(grad, student, teacher, stats, keys, *args, False), reps)]
        nld_args = (2.0, 0.1, 1.0, True, False)  # the default mixture with the adaptive scale

        def nld_forward():
            return ops.nld_rows_forward(student, teacher, seed, *nld_args)

        rows, stats = nld_forward()
        grad = torch.ones_like(rows)
        out[f"nld_loss {T}x{B}x{C}"] = [_median_us(nld_forward, reps), _median_us(
            lambda: ops.nld_rows_backward(grad, student, teacher, seed, stats, *nld_args, False), reps)]
    return out


def measure_in_this_process(so_path: str, reps: int, families, smoke: bool) -> dict[str, list[float]]:
    """{case: [forward us, backward us]} for the extension at ``so_path`` (the child's work); with
    ``smoke`` the first shape of each family only."""
    import torch

    torch.ops.load_library(so_path)
    ops = torch.ops.snnkd_fast
    out = {}
    if "neurons" in families:
        out.update(measure_neurons(ops, reps, NEURON_SHAPES[:1] if smoke else NEURON_SHAPES))
    if "losses" in families:
        out.update(measure_losses(ops, reps, SHAPES[:1] if smoke else SHAPES))
    return out


def build_base(rev: str, workdir: Path) -> Path:
    """The extension of commit ``rev``, built in place in a git worktree under ``workdir``."""
    tree = workdir / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    print(f"building {rev} in {tree} ...", flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                   capture_output=True)
    built = sorted(tree.glob("snnkd_fast/_C*.so"))
    if not built:
        raise RuntimeError(f"no extension built in {tree}")
    return built[0]


def installed_so() -> Path:
    built = sorted((REPO_ROOT / "snnkd_fast").glob("_C*.so"))
    if not built:
        raise RuntimeError("the working tree has no built extension: pip install --no-build-isolation -e .")
    return built[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="commit to build and compare against")
    which.add_argument("--base-so", help="an already built extension to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per build (default 3)")
    parser.add_argument("--reps", type=int, default=60, help="timed calls per case and round (default 60)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--ops", default="losses",
                        help="comma-separated op families: losses, neurons (default: losses)")
    parser.add_argument("--name", default="ab_kernels", help="output file name, without extension")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest shape, one round, 3 calls (checks that the script runs)")
    parser.add_argument("--child", nargs=2, metavar=("SO", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.reps = 1, 3
    families = tuple(args.ops.split(","))
    unknown = set(families) - set(OP_FAMILIES)
    if unknown:
        parser.error(f"--ops: unknown op families {sorted(unknown)}; choose from {OP_FAMILIES}")
    threads = common.configure_threads()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(measure_in_this_process(args.child[0], args.reps, families,
                                                                          args.smoke)))
        return 0
    common.reexec_with_timing_malloc()  # the benchmarks' malloc settings, inherited by the children

    import torch

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="snnkd_ab_") as tmp:
        workdir = Path(tmp)
        base_so = Path(args.base_so) if args.base_so else build_base(args.base, workdir)
        builds = {"base": base_so, "new": installed_so()}
        best: dict[str, dict[str, list[float]]] = {}
        try:
            for round_index in range(args.rounds):
                for label, so in builds.items():  # alternating: drift in the machine hits both
                    result = workdir / f"{label}_{round_index}.json"
                    subprocess.run([sys.executable, __file__, "--base-so", str(so), "--reps", str(args.reps),
                                    "--ops", args.ops, *(["--smoke"] if args.smoke else []),
                                    "--child", str(so), str(result)],
                                   check=True)
                    for case, times in json.loads(result.read_text()).items():
                        kept = best.setdefault(label, {}).setdefault(case, times)
                        best[label][case] = [min(a, b) for a, b in zip(kept, times)]
                print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        finally:
            if args.base:
                subprocess.run(["git", "worktree", "remove", "--force", str(workdir / "base")], cwd=REPO_ROOT,
                               capture_output=True)
    rows = []
    for case, (base_fwd, base_bwd) in best["base"].items():
        new_fwd, new_bwd = best["new"][case]
        op, shape = case.split(" ")
        rows.append({"op": op, "shape": shape, "base_fwd_us": base_fwd, "new_fwd_us": new_fwd,
                     "base_bwd_us": base_bwd, "new_bwd_us": new_bwd, "speedup_fwd": base_fwd / new_fwd,
                     "speedup_bwd": base_bwd / new_bwd,
                     "speedup_fwdbwd": (base_fwd + base_bwd) / (new_fwd + new_bwd)})
        print(f"{case:32s} fwd {base_fwd:9.1f} -> {new_fwd:9.1f} us ({base_fwd / new_fwd:4.2f}x)   "
              f"bwd {base_bwd:9.1f} -> {new_bwd:9.1f} us ({base_bwd / new_bwd:4.2f}x)")
    meta = common.run_metadata(device, sys.argv[1:], threads, base=args.base or str(args.base_so),
                               rounds=args.rounds, reps=args.reps, ops=args.ops,
                               method="raw ops of each build in alternating fresh processes; best median")
    out = args.out or common.default_out_dir(device)
    common.write_json(out / f"{args.name}.json", meta, rows)
    common.write_csv(out / f"{args.name}.csv", rows, ["op", "shape"])
    print(f"wrote {out / args.name}.json and {args.name}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
