"""End-to-end ANN -> SNN distillation on real data, comparing the package's methods.

    python -m snnkd_fast.examples.distill                   # scikit-learn's handwritten digits (offline)
    python -m snnkd_fast.examples.distill --data-dir DIR    # CIFAR-10 from the python-pickle batches in DIR
    python -m snnkd_fast.examples.distill --smoke           # a seconds-long run (CI)

One ANN teacher (a small CNN) is trained on the training images. Then, with the same SNN student
(the teacher's topology with snnkd_fast LIF neurons instead of ReLUs, T timesteps of direct
encoding), the same seeds and the same number of epochs, each method trains a fresh student:

  none             CE on the time-averaged logits (no distillation)
  hinton           + kd_kl (Hinton KD on time-averaged logits, tau = 4)
  per_timestep_kl  + per_timestep_kl (tau = 4)
  tser             + tser_loss (per-timestep KL with the entropy term, tau = 4, lambda = 0.1)
  hta_kl           + hta_kl (head/tail-aware KL per timestep, tau = 4)
  nld              + nld_loss (CKDSNN's noise-smoothed logits, tau = 2)
  samd             + SAMD on the last stage's activation maps (CKDSNN, tau = 2)
  blockwise        hybrid block-wise replacement (every hybrid M_k, rate-based backward)
  stars            data-free: the student never sees a training image; it learns with kd_kl from a
                   pool of batches synthesised against the teacher (BN matching, CE to the target
                   class, RCA with the current student, TAR), a few new batches every epoch

Every KD method's objective is ``CE + kd_weight * KD`` except stars (KD only: no labels of real
images); blockwise uses kd_weight for its hybrid and student KD terms. kd_weight defaults to 0.1: the KD terms carry
Hinton's tau^2 (16 at tau = 4), and at weight 1 they swamp CE in this short schedule (measured:
Hinton KD then ends ~14 points below plain training on digits; the same with the reference backend). Reported per method: test
accuracy mean +- std over the seeds, the difference to "none", training seconds per epoch, and the
peak memory growth of one training run (CPU: peak RSS; GPU: max_memory_allocated). Results go to a
JSON file and a PNG plot. On a small data set like digits, distillation often does not beat plain
training: the table says so when it happens.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..methods import HybridDistiller, Synthesizer, TimeDistributed, direct_encoding, reset_neurons, samd_loss
from ..nn import LIFNode

METHODS = ("none", "hinton", "per_timestep_kl", "tser", "hta_kl", "nld", "samd", "blockwise", "stars")

try:  # progress bars when tqdm is installed (scripts/setup.sh installs it)
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable, **_):
        return iterable


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

@dataclass
class Data:
    name: str
    x_train: torch.Tensor  # [N, C, H, W] float32 in [0, 1]-ish, normalised per channel
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return (torch.from_numpy((x_train - mean) / std).float(), torch.from_numpy((x_test - mean) / std).float())


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), a fixed split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = _normalise(x[train], x[test])
    return Data("digits", x_train, torch.from_numpy(y[train]), x_test, torch.from_numpy(y[test]), 10)


def load_cifar10(data_dir: Path) -> Data:
    """CIFAR-10 from the standard python-pickle batches (data_batch_1..5, test_batch) in data_dir,
    read with numpy; nothing is downloaded."""
    def read(name):
        path = Path(data_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"--data-dir: {path} not found (expected the CIFAR-10 python batches: "
                                    "data_batch_1..5 and test_batch)")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        return np.asarray(batch["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0, np.asarray(batch["labels"])

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = read("test_batch")
    x_train_t, x_test_t = _normalise(x_train, x_test)
    return Data("cifar10", x_train_t, torch.from_numpy(y_train).long(), x_test_t, torch.from_numpy(y_test).long(), 10)


# ------------------------------------------------------------------------------------------------
# models: the teacher and the student share a topology of three blocks and a head
# ------------------------------------------------------------------------------------------------

def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class Teacher(nn.Module):
    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(*_conv_bn(in_channels, width), nn.ReLU()),
            nn.Sequential(*_conv_bn(width, 2 * width), nn.ReLU(), nn.AvgPool2d(2)),
            nn.Sequential(*_conv_bn(2 * width, 2 * width), nn.ReLU()),
        ])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Student(nn.Module):
    """The teacher's topology with LIF neurons (multi-step, [T, B, ...]) in place of the ReLUs."""

    def __init__(self, in_channels: int, width: int, num_classes: int, T: int, backend: str = "auto"):
        super().__init__()
        self.T = T

        def lif():
            return LIFNode(tau=2.0, step_mode="m", surrogate_function="atan", detach_reset=True, backend=backend)

        self.blocks = nn.ModuleList([
            nn.Sequential(TimeDistributed(*_conv_bn(in_channels, width)), lif()),
            nn.Sequential(TimeDistributed(*_conv_bn(width, 2 * width)), lif(), TimeDistributed(nn.AvgPool2d(2))),
            nn.Sequential(TimeDistributed(*_conv_bn(2 * width, 2 * width)), lif()),
        ])
        self.head = TimeDistributed(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] -> (logits [T, B, K], last block's spikes [T, B, Ch, H', W'])."""
        reset_neurons(self)
        h = direct_encoding(x, self.T)
        for block in self.blocks:
            h = block(h)
        return self.head(h), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

@dataclass
class Config:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2)
    epochs: int = 20
    teacher_epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    T: int = 4
    width: int = 8
    kd_weight: float = 0.1       # CE + kd_weight * KD; the KD terms carry the Hinton tau^2 factor
    stars_batches: int = 4       # synthetic batches added to the pool per epoch
    stars_steps: int = 30        # optimisation steps per synthetic batch
    stars_pool: int = 64         # synthetic batches kept (oldest dropped first)
    stars_train_batches: int = 16  # student steps per epoch, on batches drawn from the pool
    train_subset: Optional[int] = None
    backend: str = "auto"
    device: str = "cpu"
    out: Optional[str] = None
    threads: int = 0


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        logits = logits.float().mean(0) if logits.dim() == 3 else logits
        correct += (logits.argmax(-1) == y[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(y)


def train_teacher(data: Data, cfg: Config, device: torch.device) -> Teacher:
    torch.manual_seed(1234)
    teacher = Teacher(data.x_train.shape[1], cfg.width, data.num_classes).to(device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(1234)
    x, y = data.x_train.to(device), data.y_train.to(device)
    for _ in tqdm(range(cfg.teacher_epochs), desc="teacher", leave=False):
        for idx in _batches(len(y), cfg.batch_size, gen):
            loss = F.cross_entropy(teacher(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    teacher.eval().requires_grad_(False)
    return teacher


def _kd_objective(method: str, cfg: Config) -> Callable:
    """(student_logits [T,B,K], features, teacher_logits [B,K], teacher_features, teacher, y) -> loss."""
    def ce(z, y):
        return F.cross_entropy(z.float().mean(0), y)

    kd = {
        "none": None,
        "hinton": lambda z, zt, **_: losses.kd_kl(z, zt, temperature=4.0, backend=cfg.backend),
        "per_timestep_kl": lambda z, zt, **_: losses.per_timestep_kl(z, zt, temperature=4.0, backend=cfg.backend),
        "tser": lambda z, zt, **_: losses.tser_loss(z, zt, temperature=4.0, entropy_weight=0.1, backend=cfg.backend),
        "hta_kl": lambda z, zt, **_: losses.hta_kl(z, zt, temperature=4.0, backend=cfg.backend),
        "nld": lambda z, zt, **_: losses.nld_loss(z, zt, temperature=2.0, backend=cfg.backend),
        "samd": lambda z, zt, feats, t_feats, teacher: samd_loss(
            feats, t_feats, teacher.head[-1].weight, teacher_logits=zt, temperature=2.0),
    }[method]

    def objective(z, feats, zt, t_feats, teacher, y):
        loss = ce(z, y)
        if kd is not None:
            loss = loss + cfg.kd_weight * kd(z, zt, feats=feats, t_feats=t_feats, teacher=teacher)
        return loss

    return objective


class _PeakMemory:
    """Peak memory growth of a block of work: on a GPU ``max_memory_allocated``; on a Linux CPU the
    peak RSS growth (VmHWM after resetting it through /proc/self/clear_refs), with glibc told to
    give every block of 64 KiB or more straight back to the system (``mallopt``) while measuring, so
    that memory freed earlier in the process cannot hide what this block allocates. None elsewhere."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device):
        self.device, self.start, self.peak, self._libc = device, None, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import ctypes

            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            self._libc.mallopt(self.M_TRIM_THRESHOLD, 0)
            self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status("VmRSS:")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = self._status("VmHWM:") - self.start
            self._libc.mallopt(self.M_MMAP_THRESHOLD, 128 * 1024)  # glibc's default
            self._libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name))


def train_student(method: str, seed: int, teacher: Teacher, data: Data, cfg: Config, device: torch.device) -> dict:
    torch.manual_seed(seed)
    student = Student(data.x_train.shape[1], cfg.width, data.num_classes, cfg.T, cfg.backend).to(device)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.x_train.to(device), data.y_train.to(device)
    distiller, synthesizer, objective = None, None, None
    if method == "blockwise":
        distiller = HybridDistiller(list(student.blocks), list(teacher.blocks), teacher.head,
                                    student_head=student.head, T=cfg.T, neuron_backward="rate",
                                    hybrid_weights=cfg.kd_weight, student_kd_weight=cfg.kd_weight,
                                    backend=cfg.backend).to(device)
        distiller.initialize(x[:cfg.batch_size])
        params = distiller.student_parameters()
    else:
        params = list(student.parameters())
    if method == "stars":
        synthesizer = Synthesizer(teacher, tuple(x.shape[1:]), data.num_classes, batch_size=cfg.batch_size,
                                  steps=cfg.stars_steps, device=device,
                                  rng=torch.Generator().manual_seed(10_000 + seed))
    elif method != "blockwise":
        objective = _kd_objective(method, cfg)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)

    pool: list[torch.Tensor] = []  # STARS: synthetic batches, a memory bank as in DeepInversion/Fast-DFKD

    def step(idx) -> None:
        if synthesizer is not None:  # data-free: idx is a batch of the synthetic pool
            x_syn = pool[idx]
            loss = losses.kd_kl(student(x_syn), teacher(x_syn), temperature=4.0, backend=cfg.backend)
        elif distiller is not None:
            loss = distiller.loss(x[idx], y[idx])
        else:
            z, feats = student.forward_with_features(x[idx])
            with torch.no_grad():
                t_feats = teacher.features(x[idx])
                zt = teacher.head(t_feats)
            loss = objective(z, feats, zt, t_feats, teacher, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def epoch_batches():
        if synthesizer is not None:
            # new batches synthesised against the teacher (and the current student, for RCA), the
            # oldest dropped past the pool's size, then student steps on batches drawn from it
            for _ in range(cfg.stars_batches):
                pool.append(synthesizer.synthesize(student)[0])
            del pool[:max(0, len(pool) - cfg.stars_pool)]
            return torch.randint(0, len(pool), (cfg.stars_train_batches,), generator=gen).tolist()
        return list(_batches(len(y), cfg.batch_size, gen))

    epoch_seconds = []
    for epoch in range(cfg.epochs):
        student.train()
        if distiller is not None:
            distiller.set_epoch(epoch)
        start = time.perf_counter()
        for idx in epoch_batches():
            step(idx)
        epoch_seconds.append(time.perf_counter() - start)
    if distiller is not None:
        distiller.set_neuron_backward("bptt")
    accuracy = evaluate(student, data.x_test.to(device), data.y_test.to(device))
    # Memory of training, measured apart from the timing (the measurement slows allocation): one
    # more step on a full batch, after the run so that one-time allocations are behind us.
    with _PeakMemory(device) as memory:
        step(0 if synthesizer is not None else torch.arange(min(cfg.batch_size, len(y)), device=device))
    return {"method": method, "seed": seed, "accuracy": accuracy, "seconds_per_epoch": float(np.mean(epoch_seconds)),
            "peak_memory_bytes": memory.peak}


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------

def summarise(runs: list[dict], methods: tuple) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        acc = np.array([r["accuracy"] for r in mine])
        mems = [r["peak_memory_bytes"] for r in mine if r["peak_memory_bytes"] is not None]
        rows.append({"method": method, "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                     "seeds": len(mine), "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in mine])),
                     "peak_memory_mb": float(np.max(mems)) / 2 ** 20 if mems else None})
    base = next((r for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["delta_vs_none"] = None if base is None else r["accuracy_mean"] - base["accuracy_mean"]
    return rows


def format_table(rows: list[dict], teacher_accuracy: float) -> str:
    lines = [f"teacher (ANN) test accuracy: {100 * teacher_accuracy:.2f}%",
             f"{'method':<16} {'accuracy %':>16} {'vs none':>9} {'s/epoch':>8} {'peak MB':>8}"]
    for r in rows:
        delta = "" if r["delta_vs_none"] is None or r["method"] == "none" else f"{100 * r['delta_vs_none']:+.2f}"
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
        lines.append(f"{r['method']:<16} {100 * r['accuracy_mean']:>9.2f} +- {100 * r['accuracy_std']:<4.2f} "
                     f"{delta:>9} {r['seconds_per_epoch']:>8.3f} {mem:>8}")
    base = next((r for r in rows if r["method"] == "none"), None)
    if base is not None:
        worse = [r["method"] for r in rows if r["method"] != "none" and r["accuracy_mean"] <= base["accuracy_mean"]]
        if worse:
            lines.append("did not beat training without distillation here: " + ", ".join(worse) +
                         " (a small data set and a short schedule; differences within one std are noise)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["method"] for r in rows]
    means = [100 * r["accuracy_mean"] for r in rows]
    stds = [100 * r["accuracy_std"] for r in rows]
    colors = ["0.6" if n == "none" else "tab:blue" for n in names]
    ax.bar(names, means, yerr=stds, color=colors, capsize=4)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _git_commit() -> Optional[str]:
    """HEAD of the checkout this file lives in, "-dirty" when tracked files differ from it (committed
    results under benchmarks/results/, which the benchmarks rewrite, do not count)."""
    root = str(Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results"],
                               capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def parse_args(argv: Optional[list[str]]) -> Config:
    parser = argparse.ArgumentParser(description="ANN -> SNN distillation on real data with snnkd_fast's methods")
    parser.add_argument("--data-dir", help="folder with the CIFAR-10 python batches (default: scikit-learn digits)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default 20; 1 with --smoke)")
    parser.add_argument("--kd-weight", type=float, default=0.1, help="weight of the KD term next to CE (0.1)")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--T", type=int, default=4, help="timesteps")
    parser.add_argument("--width", type=int, default=None, help="channels of the first block (8; 32 on CIFAR-10)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="auto", help="snnkd_fast backend for the neurons and losses")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="output folder (default: examples_out/distill_<dataset>)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run on a subset (CI)")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    cfg = Config(dataset="cifar10" if args.data_dir else "digits", data_dir=args.data_dir, methods=methods,
                 seeds=tuple(range(args.seeds)), T=args.T, batch_size=args.batch_size, backend=args.backend,
                 device=args.device, out=args.out, threads=args.threads, kd_weight=args.kd_weight)
    if args.width is not None:
        cfg.width = args.width
    elif cfg.dataset == "cifar10":
        cfg.width = 32
    if args.smoke:
        cfg.epochs, cfg.teacher_epochs, cfg.seeds, cfg.train_subset = 1, 2, (0,), 256
        cfg.stars_batches, cfg.stars_steps, cfg.stars_train_batches = 1, 3, 2
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.teacher_epochs is not None:
        cfg.teacher_epochs = args.teacher_epochs
    return cfg


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data = load_cifar10(Path(cfg.data_dir)) if cfg.data_dir else load_digits()
    if cfg.train_subset:
        data.x_train, data.y_train = data.x_train[:cfg.train_subset], data.y_train[:cfg.train_subset]
    out = Path(cfg.out or f"examples_out/distill_{data.name}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"data: {data.name}, {len(data.y_train)} training / {len(data.y_test)} test images "
          f"{tuple(data.x_train.shape[1:])}; student T={cfg.T}, {len(cfg.seeds)} seed(s), {cfg.epochs} epoch(s)")
    started = time.perf_counter()
    teacher = train_teacher(data, cfg, device)
    teacher_accuracy = evaluate(teacher, data.x_test.to(device), data.y_test.to(device))
    print(f"teacher (ANN) test accuracy: {100 * teacher_accuracy:.2f}%")
    runs = []
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    for method, seed in tqdm(jobs, desc="students"):
        runs.append(train_student(method, seed, teacher, data, cfg, device))
    rows = summarise(runs, cfg.methods)
    table = format_table(rows, teacher_accuracy)
    print(table)
    result = {"meta": {"command": " ".join([Path(sys.executable).name, "-m", "snnkd_fast.examples.distill"] +
                                          (argv if argv is not None else sys.argv[1:])),
                       "git_commit": _git_commit(), "config": asdict(cfg), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                       or platform.machine(), "threads": torch.get_num_threads(),
                       "total_seconds": time.perf_counter() - started},
              "teacher_accuracy": teacher_accuracy, "summary": rows, "runs": runs}
    (out / f"distill_{data.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"distill_{data.name}.txt").write_text(table + "\n")
    plot(rows, out / f"distill_{data.name}.png",
         f"{data.name}: SNN student (T={cfg.T}) accuracy by distillation method, {len(cfg.seeds)} seed(s)")
    print(f"wrote {out}/distill_{data.name}.json, .txt and .png in {time.perf_counter() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()
