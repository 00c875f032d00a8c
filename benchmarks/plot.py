"""Plots of benchmark results: speed-up over the reference per backend, and peak memory, per case.

    python benchmarks/plot.py [RESULTS_DIR ...]   # default: every folder under benchmarks/results/

For each result file ``NAME.json`` in a folder it writes ``NAME_speedup.png`` (one panel per pass:
forward, backward, forward+backward) and ``NAME_memory.png`` (fwd+bwd peak memory) beside it. A file
whose rows measure several ops (``bench_losses``: one op per loss) gets one pair per op,
``NAME_<op>_speedup.png`` and ``NAME_<op>_memory.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from common import DEVICE_PASS, RESULTS_DIR, load_results

PASS_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward + backward",
               DEVICE_PASS: "fwd + bwd, device time"}  # the last: GPU runs only


def _ordered(values) -> list:
    """Distinct values in first-seen order (the order the benchmark measured them in)."""
    return list(dict.fromkeys(values))


def _grouped_bars(ax, cases: list[str], backends: list[str], value: dict[tuple[str, str], Optional[float]],
                  colors: dict[str, Any], bottom: float = 0.0) -> None:
    """One group of bars per case, one bar per backend, drawn from ``bottom`` to the value (missing
    values leave a gap)."""
    width = 0.8 / max(len(backends), 1)
    for index, backend in enumerate(backends):
        points = [(position, value.get((case, backend))) for position, case in enumerate(cases)]
        points = [(position, height) for position, height in points if height is not None]
        if points:
            positions, heights = zip(*points)
            ax.bar([p + (index - (len(backends) - 1) / 2) * width for p in positions],
                   [h - bottom for h in heights], width, bottom=bottom, label=backend, color=colors[backend])
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _title(meta: dict[str, Any], what: str, op: Optional[str] = None) -> str:
    return (f"{op or meta.get('op', '')} {what}: {meta['device_name']}, {meta.get('threads', '?')} threads, "
            f"{meta.get('grid', '')} grid, commit {meta['git_commit'][:10]}")


def plot_file(path: Path, data: dict[str, Any]) -> list[Path]:
    """The plots of one result file: one pair, or one pair per op when its rows measure several."""
    meta, rows = data["meta"], data["results"]
    ops = _ordered(row.get("op", meta.get("op", "")) for row in rows)
    if len(ops) <= 1:
        return _plot_rows(path.stem, path, meta, rows, None)
    written = []
    for op in ops:
        op_rows = [row for row in rows if row.get("op") == op]
        written += _plot_rows(f"{path.stem}_{op}", path, meta, op_rows, op)
    return written


def _plot_rows(stem: str, path: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
               op: Optional[str]) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    reference = meta.get("reference", "torch")
    cases = _ordered(row["case"] for row in rows)
    # Tick labels without the op's name where the case labels start with it (it is in the title).
    labels = [case.removeprefix(f"{op} ") if op else case for case in cases]
    backends = _ordered(row["backend"] for row in rows)
    cmap = plt.get_cmap("tab10")
    colors = {backend: cmap(index % 10) for index, backend in enumerate(backends)}
    width_in = max(8.0, 0.35 * len(cases) * len(backends) + 3)
    written = []

    # Speed-ups are ratios, so a log axis, with bars growing from 1x: up is faster than the
    # reference, down is slower.
    passes = [p for p in PASS_TITLES if any(row["pass"] == p for row in rows)]
    fig, axes = plt.subplots(len(passes), 1, figsize=(width_in, 3.2 * len(passes) + 1.5), sharex=True, squeeze=False)
    others = [backend for backend in backends if backend != reference]
    for ax, pass_ in zip(axes[:, 0], passes):
        speedup = {(row["case"], row["backend"]): row.get("speedup_vs_reference")
                   for row in rows if row["pass"] == pass_}
        _grouped_bars(ax, cases, others, speedup, colors, bottom=1.0)
        ax.set_yscale("log", base=2)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, 0.5), max(high, 2.0))  # at least 0.5x..2x, so the axis has labelled ticks
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{PASS_TITLES[pass_]}\nspeed-up vs {reference}")
    axes[-1, 0].set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8, ncol=len(others))
    fig.suptitle(_title(meta, "speed-up over the reference", op), fontsize=10)
    fig.tight_layout()
    written.append(path.with_name(f"{stem}_speedup.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    memory = {(row["case"], row["backend"]): row["peak_mem_bytes"] / 2**20
              for row in rows if row["pass"] == "fwdbwd" and row.get("peak_mem_bytes") is not None}
    if memory:
        fig, ax = plt.subplots(figsize=(width_in, 4.5))
        _grouped_bars(ax, cases, backends, memory, colors)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("fwd+bwd peak memory (MiB)")
        ax.legend(fontsize=8, ncol=len(backends))
        ax.set_title(_title(meta, "peak memory", op), fontsize=10)
        fig.tight_layout()
        written.append(path.with_name(f"{stem}_memory.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", nargs="*", type=Path,
                        help="folders holding result JSON files (default: every folder under benchmarks/results/)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    dirs = args.results_dirs or sorted(path for path in RESULTS_DIR.iterdir() if path.is_dir())
    written = []
    for results_dir in dirs:
        for path, data in load_results(results_dir):
            written += plot_file(path, data)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no result JSON files in {', '.join(map(str, dirs)) or RESULTS_DIR}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
