"""The two BPTT kernel pairs of the neurons, side by side in one process on one build: the saved-H
pair (``lif_forward`` writes the charged membrane H [T, ...], ``lif_backward`` reads it) and the
lean pair (``lif_forward_lean`` writes no H, ``lif_backward_from_x`` recharges it from x).

Why: which pair a backend runs is a measured choice. The cpp backend runs the lean pair (measured on
the CPU, README). On CUDA the lean pair's kernels are registered and tested but the cuda backend
still runs the saved-H pair until this benchmark shows the lean pair's gain on a GPU: fp32 traffic
per neuron-step 20 bytes instead of 24 over forward+backward (forward 8 instead of 12), and nothing
T-long kept for the backward beyond x itself (H: T*N float32, twice a bf16 input's bytes).

    python benchmarks/ab_neuron_pairs.py                    # CPU
    python benchmarks/ab_neuron_pairs.py --device cuda      # device time (CUDA events, queued launches)

The raw ops are timed (no autograd, no Python wrapper): LIF, tau = 2, sigmoid surrogate, a one-value
v_init (what lif_multistep passes), a spike gradient, fp32 and (CUDA) bf16. Rounds alternate the
pairs and keep each pass's best median. Writes ``benchmarks/results/<device-slug>/ab_neuron_pairs.json``
(and .csv): per case each pair's fwd / bwd / fwd+bwd time, achieved bandwidth over its own bytes,
the bytes kept between the passes, on a GPU one fwd+bwd's peak allocation above the inputs
(``torch.cuda.max_memory_allocated``), and lean/saved-H speed-ups; a table on stdout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

PAIRS = {"saved_h": ("lif_forward", "lif_backward"), "lean": ("lif_forward_lean", "lif_backward_from_x")}
# (T, one step's shape): an MLP layer, the CPU grid's conv layer, an ImageNet-sized conv map; on CUDA
# also T = 32 and 48 (H staged in 32 / 48 KiB of shared memory per block) and T = 96 (beyond the
# 64 steps the backward stages in fp32: its recharge-into-a-temporary-H path)
SHAPES = {
    "cpu": [(4, (64, 1024)), (8, (64, 4096)), (16, (32, 64, 16, 16))],
    "cuda": [(4, (64, 4096)), (8, (64, 128, 32, 32)), (16, (64, 128, 32, 32)), (32, (32, 128, 32, 32)),
             (48, (16, 128, 32, 32)), (96, (8, 128, 32, 32))],
}
QUICK_SHAPES = {"cpu": [(4, (64, 1024))], "cuda": [(8, (64, 128, 32, 32))]}
# neuron, tau, decay_input, v_threshold, v_reset, soft_reset, detach_reset, surrogate (sigmoid), alpha
SCALARS = (1, 2.0, True, 1.0, 0.0, False, False, 0, 4.0)


def pair_bytes(pair: str, pass_: str, numel: int, dtype: torch.dtype) -> int:
    """The traffic a pass of ``pair`` needs at least: forward reads x and writes spikes (+ H, acc dtype,
    for saved_h); backward reads the spike gradient and H (saved_h) or x (lean), writes grad_x."""
    io = torch.finfo(dtype).bits // 8
    acc = 8 if dtype == torch.float64 else 4
    forward = numel * (2 * io + (acc if pair == "saved_h" else 0))
    backward = numel * (2 * io + (acc if pair == "saved_h" else io))
    return {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[pass_]


def measure(device: torch.device, T: int, step: tuple[int, ...], dtype: torch.dtype, timer: common.Timer,
            rounds: int) -> dict[str, dict[str, float]]:
    """{pair: {pass: best median ms, and on a GPU "peak_bytes": one fwd+bwd's peak allocation above
    the inputs}}."""
    ops = torch.ops.snnkd_fast
    x = (torch.randn((T, *step), device=device) * 1.5 + 0.4).to(dtype)
    grad_spikes = torch.randn_like(x)
    v_init = torch.zeros(1, device=device)
    best: dict[str, dict[str, float]] = {pair: {} for pair in PAIRS}
    for _ in range(rounds):
        for pair, (forward_name, backward_name) in PAIRS.items():
            forward, backward = getattr(ops, forward_name), getattr(ops, backward_name)
            kept = x if pair == "lean" else forward(x, v_init, None, *SCALARS)[2]

            def run_backward(_state, kept=kept, backward=backward):
                return backward(grad_spikes, None, kept, v_init, None, dtype, *SCALARS, False)

            def run_both(_state, forward=forward, backward=backward, pair=pair):
                outputs = forward(x, v_init, None, *SCALARS)
                return backward(grad_spikes, None, x if pair == "lean" else outputs[2], v_init, None, dtype,
                                *SCALARS, False)

            timings = {"fwd": timer(lambda _state, forward=forward: forward(x, v_init, None, *SCALARS)),
                       "bwd": timer(run_backward), "fwdbwd": timer(run_both)}
            for pass_, timing in timings.items():
                best[pair][pass_] = min(best[pair].get(pass_, float("inf")), timing.median_ms)
            del kept
            if device.type == "cuda" and "peak_bytes" not in best[pair]:
                # what one forward+backward allocates above the inputs: the forward's outputs and
                # what it keeps (H or nothing), then the backward's (the lean pair's T > 32 path: a
                # temporary H inside the backward)
                best[pair]["peak_bytes"] = common.measure_peak(lambda run=run_both: run(None), device)[0]
    return best


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="one shape, fp32, one round")
    parser.add_argument("--rounds", type=int, help="alternations of the two pairs (default 3 on the CPU, 2 on a "
                        "GPU, whose device time varies little)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--name", default="ab_neuron_pairs", help="result file name (default ab_neuron_pairs)")
    common.add_default_malloc_option(parser)
    args = parser.parse_args(argv)
    start, device, threads = common.begin_run(args)
    import snnkd_fast

    status = snnkd_fast.backends()["cuda" if device.type == "cuda" else "cpp"]
    if not status:
        raise SystemExit(f"the C++ extension's {device.type} kernels are unavailable: {status.reason}")
    if device.type == "cuda":  # device time: the two pairs cost the host alike (one op each per pass)
        timer = common.Timer(device, budget_s=0.2, warmup_s=0.05, queued=True)
    else:
        timer = common.Timer(device, budget_s=0.4, warmup_s=0.1)
    peak_bps, peak_source = common.peak_bandwidth(device, common.Timer(device, budget_s=0.5, warmup_s=0.1))
    shapes = (QUICK_SHAPES if args.quick else SHAPES)[device.type]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" and not args.quick else [])
    rounds = 1 if args.quick else args.rounds or (2 if device.type == "cuda" else 3)
    rows = []
    print(f"{'case':34s} {'pass':7s} {'saved_h ms':>11s} {'lean ms':>9s} {'lean/saved':>10s} {'GB/s s/l':>13s}")
    for dtype in dtypes:
        for T, step in shapes:
            numel = T * int(torch.Size(step).numel())
            best = measure(device, T, step, dtype, timer, rounds)
            case = f"T={T} {'x'.join(map(str, step))} {str(dtype).replace('torch.', '')}"
            kept = {"saved_h": numel * 4, "lean": 0}  # H (float32) vs nothing beyond x
            for pass_ in ("fwd", "bwd", "fwdbwd"):
                row = {"case": case, "T": T, "shape": [T, *step], "dtype": str(dtype).replace("torch.", ""),
                       "pass": pass_}
                for pair in PAIRS:
                    ms = best[pair][pass_]
                    row[f"{pair}_ms"] = ms
                    row[f"{pair}_bytes_min"] = pair_bytes(pair, pass_, numel, dtype)
                    row[f"{pair}_GBps"] = pair_bytes(pair, pass_, numel, dtype) / (ms * 1e-3) / 1e9
                    row[f"{pair}_pct_peak"] = 100 * row[f"{pair}_GBps"] * 1e9 / peak_bps
                    row[f"{pair}_kept_bytes"] = kept[pair]
                    if pass_ == "fwdbwd" and "peak_bytes" in best[pair]:
                        row[f"{pair}_peak_bytes"] = best[pair]["peak_bytes"]
                row["speedup_lean_vs_saved_h"] = best["saved_h"][pass_] / best["lean"][pass_]
                if "lean_peak_bytes" in row:
                    row["peak_mem_lean_vs_saved_h"] = row["lean_peak_bytes"] / row["saved_h_peak_bytes"]
                rows.append(row)
                print(f"{case:34s} {pass_:7s} {row['saved_h_ms']:11.4f} {row['lean_ms']:9.4f} "
                      f"{row['speedup_lean_vs_saved_h']:9.2f}x {row['saved_h_GBps']:6.0f}/{row['lean_GBps']:<6.0f}")
    meta = common.run_metadata(device, sys.argv[1:] if argv is None else list(argv), threads, op="lif_pairs",
                               grid="quick" if args.quick else "full", rounds=rounds, scalars=list(SCALARS),
                               peak_bandwidth_Bps=peak_bps, peak_bandwidth_source=peak_source,
                               timing_method=("CUDA device time: queued launches, L2 flushed before each (Timer "
                                              "queued=True), best of the rounds' medians" if device.type == "cuda"
                                              else "wall clock, best of the rounds' medians"),
                               elapsed_s=time.perf_counter() - start)
    out_dir = args.out or common.default_out_dir(device)
    path = out_dir / f"{args.name}.json"
    common.write_json(path, meta, rows)
    common.write_csv(out_dir / f"{args.name}.csv", rows, ("case", "pass"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    common.reexec_with_timing_malloc()
    main()
