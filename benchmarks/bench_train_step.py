"""Benchmark of one distillation training step of a spiking CNN: what the kernels buy a whole step.

The op benchmarks (bench_lif.py, bench_losses.py) time the neurons and the losses alone; a user
swapping them into a model gets that speed-up only on their share of the step, next to
convolutions, BatchNorm and the teacher, which are the same whatever the neurons. This benchmark
times that step::

    python benchmarks/bench_train_step.py --quick            # one small CPU case, about a minute
    python benchmarks/bench_train_step.py --device cuda      # GPU cases: B = 128, width 64, fp32 and bf16 AMP

The student is a CIFAR-style spiking CNN (``SpikingCNN``: four conv-BN-LIF blocks on 32x32 images,
the convolutions and BatchNorm over the T-folded batch (``snnkd_fast.methods.TimeDistributed``, as
SpikingJelly's ``SeqToANNContainer``), average pooling, a linear head per timestep, images repeated
over T); the teacher is the same
topology with ReLU in place of LIF, in eval mode, its head scaled so that its logits spread like a
trained teacher's (``sharpen_teacher``). One step: the teacher's logits under no_grad, the
student's ``[T, B, C]`` logits, and cross-entropy on their time average plus a per-timestep KD loss
(the case's), then the backward. The optimizer's update, the same for every configuration, is left
out. "fwd" is teacher + student + loss; "bwd" the backward of that loss (graph built untimed);
"fwdbwd" both: the step.

Configurations (rows), all from the same seed (the same weights and images): ``torch``, the
reference, is snnkd_fast's pure-PyTorch LIF (SpikingJelly's torch backend's formulas) and its
pure-PyTorch loss (the papers' formulas in eager PyTorch); ``spikingjelly`` is SpikingJelly 2.0's
``LIFNode(step_mode="m")`` (on a GPU the implementation it picks itself) with that same eager loss:
the step as a SpikingJelly user runs it today; our backends (cpp on a CPU; cuda and triton on a GPU)
run our LIF and our fused loss; ``<backend>+eager_loss`` runs our LIF with the eager loss, which
splits the gain between the neurons and the loss. Every configuration's first loss and its KD term
(``loss``, ``kd_loss``) are recorded and compared with the reference's: the same numbers, not just
the same shapes.

Mixed precision (``amp``: the GPU grid's bf16 cases, ``--amp``): the step under ``torch.autocast``.
SpikingJelly's torch LIF then charges its membrane in bf16, ours in fp32 (the dtype policy in the
README), so SpikingJelly's loss differs from the reference's there (its ``|loss - ref|``).

Memory: the step's peak above what precedes it (model, inputs), as in the op benchmarks (CUDA: the
caching allocator's peak; CPU: peak-RSS growth in a fresh process per case and configuration).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import snnkd_fast
from snnkd_fast import losses
from snnkd_fast import nn as snn
from snnkd_fast.methods import TimeDistributed, direct_encoding

import common
from common import DEVICE_PASS, Timing, default_out_dir, fmt_mb, fmt_ms, fmt_ratio

OP = "train_step"
FILE_STEM = "train_step"
TAU = 2.0
REFERENCE = "torch"
DEVICE_BACKENDS = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}
PEERS = ("spikingjelly",)
PEER_LABELS = {"spikingjelly": "SpikingJelly"}
EAGER_LOSS_SUFFIX = "+eager_loss"  # our neurons, the reference loss
MEMORY_PRELOAD = ("snnkd_fast", "spikingjelly.activation_based.neuron")
KD_WEIGHT = 1.0
KD_LOSSES = {  # the case's KD term: (student [T, B, C], teacher [B, C], backend) -> loss
    "per_timestep_kl": lambda z, zt, backend: losses.per_timestep_kl(z, zt, temperature=4.0, backend=backend),
    "tser_loss": lambda z, zt, backend: losses.tser_loss(z, zt, temperature=4.0, entropy_weight=0.1,
                                                         backend=backend),
    "hta_kl": lambda z, zt, backend: losses.hta_kl(z, zt, temperature=4.0, backend=backend),
}
NOTES = (
    "spikingjelly: LIFNode(tau=2.0, step_mode='m') in the student, the same LIF as ours (decay_input, hard "
    "reset to 0, '>=' threshold, sigmoid surrogate), with the eager (reference) loss.",
    "<backend>+eager_loss: our neurons with the eager (reference) loss, to split the gain between the two.",
)
CSV_COLUMNS = ("op", "case", "backend", "kind", "pass", "T", "batch", "width", "classes", "loss_name", "dtype",
               "median_ms", "p20_ms", "p80_ms", "reps", "peak_mem_bytes", "loss", "loss_abs_diff_vs_reference",
               "kd_loss", "kd_rel_diff_vs_reference", "speedup_vs_reference",
               "mem_ratio_vs_reference")  # then speedup_vs_<peer>


# --------------------------------------------------------------------------------------------------
# cases and models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    loss: str  # a key of KD_LOSSES
    T: int
    batch: int
    width: int  # channels of the first block (then 2w, 2w, 4w)
    classes: int
    image: int = 32
    amp: Optional[str] = None  # "bfloat16" / "float16": the step under torch.autocast in that dtype

    @property
    def label(self) -> str:
        return (f"{self.loss} B={self.batch} T={self.T} w={self.width} C={self.classes} "
                f"{self.image}x{self.image}" + (f" amp {self.amp}" if self.amp else ""))


def build_grid(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        # fp32, then the usual mixed precision (bf16 autocast) for per-timestep KL
        cases = [Case(loss, T, 128, 64, 100) for loss in KD_LOSSES for T in (4, 8)]
        amp = [Case("per_timestep_kl", T, 128, 64, 100, amp="bfloat16") for T in (4, 8)]
        return cases[:1] + amp[:1] if quick else cases + amp
    if quick:
        return [Case("per_timestep_kl", 4, 16, 16, 100)]
    return [Case(loss, T, 32, 32, 100) for T in (4, 8) for loss in ("per_timestep_kl", "hta_kl")]


class SpikingCNN(nn.Module):
    """Four conv3x3-BN-activation blocks (w, 2w, 2w, 4w channels; 2x2 average pooling after the last
    three) and a linear head. ``activation()`` makes each block's activation: a multi-step spiking
    neuron on ``[T, B, ...]`` (the student), or ReLU with ``steps=None`` (the ANN teacher on ``[B, ...]``)."""

    def __init__(self, activation: Callable[[], nn.Module], width: int, classes: int, image: int,
                 steps: Optional[int]):
        super().__init__()
        self.steps = steps
        # the student's stateless layers over the T-folded batch (SpikingJelly's SeqToANNContainer)
        fold = TimeDistributed if steps else nn.Sequential
        channels = (3, width, 2 * width, 2 * width, 4 * width)
        blocks: list[nn.Module] = []
        activations = [activation() for _ in range(4)]
        for index, act in enumerate(activations):
            blocks += [fold(nn.Conv2d(channels[index], channels[index + 1], 3, padding=1, bias=False),
                            nn.BatchNorm2d(channels[index + 1])), act]
            if index > 0:
                blocks.append(fold(nn.AvgPool2d(2)))
        self.features = nn.Sequential(*blocks)
        self.head = fold(nn.Flatten(), nn.Linear(channels[-1] * (image // 8) ** 2, classes))
        self.neurons = activations if steps else []  # the stateful ones, reset before each sequence

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.steps is None:
            return self.head(self.features(images))
        for neuron in self.neurons:
            neuron.reset()
        return self.head(self.features(direct_encoding(images, self.steps)))


def make_neuron(name: str) -> Callable[[], nn.Module]:
    """The student's LIF for configuration ``name`` (raises ImportError when SpikingJelly is missing)."""
    if name == "spikingjelly":
        from spikingjelly.activation_based import neuron

        return lambda: neuron.LIFNode(tau=TAU, step_mode="m")
    backend = name.removesuffix(EAGER_LOSS_SUFFIX)
    return lambda: snn.LIFNode(tau=TAU, step_mode="m", backend=backend)


def loss_backend(name: str) -> str:
    return "torch" if name == "spikingjelly" or name.endswith(EAGER_LOSS_SUFFIX) else name


# The teacher's logits' standard deviation over the benchmark's images: an untrained network's are
# near zero, so its softmax at tau = 4 would be flat (every KD term near 0, HTA's head half the
# classes); a trained CIFAR-100 teacher's spread over several units.
TEACHER_LOGIT_STD = 3.0


def sharpen_teacher(teacher: SpikingCNN, images: torch.Tensor) -> None:
    """Scale the teacher's head so that its logits on ``images`` have ``TEACHER_LOGIT_STD``."""
    with torch.no_grad():
        scale = TEACHER_LOGIT_STD / teacher(images).std().clamp_min(1e-6)
        linear = teacher.head[-1]
        linear.weight.mul_(scale)
        linear.bias.mul_(scale)


@dataclass
class Step:
    """One configuration's training step on one case: ``forward()`` -> loss, ``zero_grad()``, and
    ``losses()`` -> (the loss, its KD term) as floats, computed without a graph."""
    forward: Callable[[], torch.Tensor]
    zero_grad: Callable[[], None]
    losses: Callable[[], tuple[float, float]]


def make_step(name: str, case: Case, device: torch.device, batch: Optional[int] = None) -> Step:
    batch = case.batch if batch is None else batch
    torch.manual_seed(0)  # the same weights and data for every configuration
    teacher = SpikingCNN(nn.ReLU, case.width, case.classes, case.image, steps=None).to(device).eval()
    student = SpikingCNN(make_neuron(name), case.width, case.classes, case.image, steps=case.T).to(device)
    images = torch.randn(batch, 3, case.image, case.image, device=device)
    labels = torch.randint(0, case.classes, (batch,), device=device)
    sharpen_teacher(teacher, images)
    kd, backend = KD_LOSSES[case.loss], loss_backend(name)

    autocast = (functools.partial(torch.autocast, device.type, dtype=getattr(torch, case.amp)) if case.amp
                else contextlib.nullcontext)

    def loss_terms() -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            with torch.no_grad():
                teacher_logits = teacher(images)
            logits = student(images)
            # autocast runs cross_entropy in float32; our losses take the half-precision logits as they are
            terms = F.cross_entropy(logits.mean(0), labels), KD_WEIGHT * kd(logits, teacher_logits, backend)
        for neuron in student.neurons:  # drop the state that would keep this step's graph alive
            neuron.reset()
        return terms

    def forward() -> torch.Tensor:
        cross_entropy, distillation = loss_terms()
        return cross_entropy + distillation

    def loss_values() -> tuple[float, float]:
        with torch.no_grad():
            cross_entropy, distillation = loss_terms()
        return (cross_entropy + distillation).item(), distillation.item()

    return Step(forward, lambda: student.zero_grad(set_to_none=True), loss_values)


kind_of = functools.partial(common.implementation_kind, reference=REFERENCE, peers=PEERS)


def select_configurations(device: torch.device, peers: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    names, skipped = common.native_backends(device, DEVICE_BACKENDS[device.type], snnkd_fast.backends(), REFERENCE)
    ours = [name for name in names if name != REFERENCE]
    names = [REFERENCE, *ours, *(f"{name}{EAGER_LOSS_SUFFIX}" for name in ours[:1])]
    for name in peers:
        try:
            make_neuron(name)()
            names.insert(1, name)
        except Exception as error:  # a missing or broken peer is reported, never fatal
            skipped[name] = f"{type(error).__name__}: {error}"
    return names, skipped


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------

def time_step(timer: common.Timer, step: Step, device_timer: Optional[common.Timer]) -> dict[str, Timing]:
    def built() -> torch.Tensor:
        step.zero_grad()
        return step.forward()

    timings = {
        "fwd": timer(lambda _: step.forward(), setup=step.zero_grad),
        "bwd": timer(lambda loss: loss.backward(), setup=built),
        "fwdbwd": timer(lambda _: step.forward().backward(), setup=step.zero_grad),
    }
    if device_timer is not None:
        timings[DEVICE_PASS] = device_timer(lambda _: step.forward().backward(), setup=step.zero_grad)
    return timings


def measure_peak_memory(name: str, case: Case, device: torch.device) -> tuple[int, bool]:
    """(bytes one step needs above the model and inputs, whether the peak counter was reset). On CPU
    this runs in a fresh process; a step on a batch of 2 first does the one-time set-up."""
    make_step(name, case, device, batch=2).forward().backward()
    step = make_step(name, case, device)
    return common.measure_peak(lambda: step.forward().backward(), device)


def measure_spec(spec: dict[str, Any]) -> tuple[int, bool]:
    """One CPU memory measurement, in a fresh process (``common.memory_worker_main``)."""
    fields = {key: value for key, value in spec.items() if key not in ("backend", "threads")}
    return measure_peak_memory(spec["backend"], Case(**fields), torch.device("cpu"))


def make_rows(case: Case, name: str, timings: dict[str, Timing], peak_mem: Optional[int],
              loss_values: tuple[float, float]) -> list[dict[str, Any]]:
    return [{"op": OP, "case": case.label, "backend": name, "kind": kind_of(name), "pass": pass_, "T": case.T,
             "batch": case.batch, "width": case.width, "classes": case.classes, "loss_name": case.loss,
             "dtype": case.amp or "float32", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms,
             "p80_ms": timing.p80_ms,
             "reps": timing.reps, "peak_mem_bytes": peak_mem if pass_ == "fwdbwd" else None,
             "loss": loss_values[0] if pass_ == "fwdbwd" else None,
             "kd_loss": loss_values[1] if pass_ == "fwdbwd" else None}
            for pass_, timing in timings.items()]


def add_loss_diffs(case_rows: list[dict[str, Any]]) -> None:
    """Each step row's loss against the reference's: the whole loss's absolute difference and its KD
    term's relative one."""
    reference = next((row for row in case_rows if row["backend"] == REFERENCE and row["loss"] is not None), None)
    for row in case_rows:
        measured = row["loss"] is not None and reference is not None
        row["loss_abs_diff_vs_reference"] = abs(row["loss"] - reference["loss"]) if measured else None
        row["kd_rel_diff_vs_reference"] = (abs(row["kd_loss"] - reference["kd_loss"]) / abs(reference["kd_loss"])
                                           if measured and reference["kd_loss"] else None)


def case_table(case_rows: list[dict[str, Any]], peers: dict[str, str]) -> str:
    by_name: dict[str, dict[str, dict]] = {}
    for row in case_rows:
        by_name.setdefault(row["backend"], {})[row["pass"]] = row
    header = ["configuration", "fwd ms", "bwd ms", "step ms", "vs ref", *(f"vs {label}" for label in peers.values()),
              "peak MB", "mem vs ref", "loss", "|loss - ref|", "KD term", "KD vs ref"]
    lines = []
    for name, passes in by_name.items():
        step = passes["fwdbwd"]
        diff, kd_diff = step.get("loss_abs_diff_vs_reference"), step.get("kd_rel_diff_vs_reference")
        lines.append([name, *(fmt_ms(passes[p]["median_ms"]) for p in ("fwd", "bwd", "fwdbwd")),
                      fmt_ratio(step["speedup_vs_reference"]), *(fmt_ratio(step.get(f"speedup_vs_{p}")) for p in peers),
                      fmt_mb(step["peak_mem_bytes"]), fmt_ratio(step["mem_ratio_vs_reference"]), f"{step['loss']:.6f}",
                      "-" if diff is None else f"{diff:.1e}", f"{step['kd_loss']:.4g}",
                      "-" if kd_diff is None else f"{kd_diff:.1e}"])
    return common.text_table(header, lines)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = common.bench_parser(__doc__.split("\n\n")[0], "one small CPU case (B=16, width 16, T=4), or the GPU "
                                 "grid's first two", PEERS)
    parser.add_argument("--losses", type=lambda text: common.parse_names(text, tuple(KD_LOSSES), "loss"),
                        default=tuple(KD_LOSSES), help=f"KD losses of the grid to run (default: all of "
                                                       f"{','.join(KD_LOSSES)} that the grid has)")
    parser.add_argument("--batch", type=int, help="batch size of every case instead of the grid's")
    parser.add_argument("--amp", choices=("bfloat16", "float16"),
                        help="run every case under torch.autocast in this dtype (the GPU grid has bf16 cases of "
                             "its own)")
    parser.add_argument("--width", type=int, help="first block's channels of every case instead of the grid's")
    args = parser.parse_args(argv)
    for name in ("batch", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    """Run the benchmark; returns the JSON file written."""
    started = common.script_start(argv, parse_args, measure_spec, MEMORY_PRELOAD)
    if started is None:  # a memory-measuring process: served
        return None
    argv, args, start, device, threads = started
    names, skipped = select_configurations(device, args.peers)
    peers = tuple(name for name in args.peers if name in names)
    timer = common.sample_timer(args, device, budget_s=1.0 if device.type == "cpu" else 0.25,
                                warmup_s=0.5 if device.type == "cpu" else 0.1, min_reps=5)
    on_device = common.device_timer(device, timer.budget_s)
    meta = common.run_metadata(device, argv, threads, op=OP, grid="quick" if args.quick else "full", tau=TAU,
                               reference=REFERENCE, peers=list(peers), skipped=skipped, notes=list(NOTES),
                               memory_method=common.memory_method(device), failures={}, kd_weight=KD_WEIGHT,
                               table_peers=list(peers), peer_labels=PEER_LABELS, time_label="step ms",
                               memory_label="the step's peak",
                               peak_bandwidth_Bps=None, peak_bandwidth_source="not used (a whole step)",
                               sample_budget_s=timer.budget_s)
    print(f"{OP} {meta['grid']} benchmark on {meta['device_name']} ({device.type}, {threads} threads), commit "
          f"{meta['git_commit'][:12]}; configurations: {', '.join(names)}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")

    out_dir = args.out or default_out_dir(device)
    rows: list[dict[str, Any]] = common.resumed_rows(out_dir, FILE_STEM, meta) if args.resume else []
    done = {row["case"] for row in rows}
    table_peers = {peer: PEER_LABELS[peer] for peer in peers}
    with common.CpuMemoryMeter(__file__, threads) if device.type == "cpu" else contextlib.nullcontext() as meter:
        try:
            for case in build_grid(device, args.quick):
                case = dataclasses.replace(case, batch=args.batch or case.batch, width=args.width or case.width,
                                           amp=args.amp or case.amp)
                if case.label in done or case.loss not in args.losses:
                    continue
                print(f"\n{case.label}")
                case_rows = []
                for name in names:
                    try:
                        step = make_step(name, case, device)
                        loss_values = step.losses()
                        timings = time_step(timer, step, on_device)
                    except Exception as error:  # ours: a failure (exit status 1); a peer's: skipped
                        common.record_case_error(meta, kind_of(name), name, case.label, error)
                        continue
                    del step
                    peak_mem = (meter(name, asdict(case)) if meter is not None
                                else measure_peak_memory(name, case, device)[0])
                    case_rows += make_rows(case, name, timings, peak_mem, loss_values)
                common.add_ratios(case_rows, REFERENCE, peers)
                add_loss_diffs(case_rows)
                print(case_table(case_rows, table_peers))
                rows += case_rows
        except KeyboardInterrupt:  # a deadline (run_gpu.sh): keep what was measured
            meta["interrupted"] = common.interrupted_note(len(rows))

    return common.write_results(out_dir, FILE_STEM, meta, rows, CSV_COLUMNS, start)


if __name__ == "__main__":
    common.reexec_with_timing_malloc()
    written = main()
    sys.exit(common.exit_status([written]) if written else 0)
