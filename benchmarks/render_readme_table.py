"""Markdown tables of the committed benchmark results: a summary for the README, every case in
benchmarks/RESULTS.md.

    python benchmarks/render_readme_table.py                  # print the full tables
    python benchmarks/render_readme_table.py --summary        # print the README's summary
    python benchmarks/render_readme_table.py --write README.md

Reads the result files under ``benchmarks/results/<device>/`` (per device and op, the full grid
where there is one, else the quick grid). The full tables give, per device, the forward+backward
time of each case and backend with its speed-up over the reference and over the file's table peers
(its ``meta["table_peers"]``; SpikingJelly where a file names none) and its peak memory relative to
the reference (and, where rows report it, the memory beyond the gradient in ``[T, B, C]`` tensors).
The summary gives, per device, op and backend of ours, the range over the grid's cases of the same
ratios. ``--write FILE`` replaces what lies between the markers ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->`` in FILE with the summary, and, where FILE has ``<!-- example-table:start -->``
and ``<!-- example-table:end -->``, the accuracy table of the distillation example's committed results
(``distill_<dataset>.json``, written by ``python -m snnkd_fast.examples.distill``); it writes the full
tables to ``--tables-out`` (default: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import json
import statistics

from common import BENCH_DIR, DEVICE_PASS, RESULTS_DIR, device_cells, fmt_extra, fmt_ms, fmt_ratio, load_results

START_MARKER = "<!-- perf-table:start -->"
END_MARKER = "<!-- perf-table:end -->"
EXAMPLE_MARKERS = ("<!-- example-table:start -->", "<!-- example-table:end -->")
GRID_PREFERENCE = ("full", "quick")  # the full grid wins when a device has both
# Peers with a column when a result file does not name its own (meta "table_peers", "peer_labels").
DEFAULT_TABLE_PEERS = ("spikingjelly",)
PEER_LABELS = {"spikingjelly": "SpikingJelly"}


def _grid_rank(data: dict[str, Any]) -> int:
    grid = data["meta"].get("grid")
    return GRID_PREFERENCE.index(grid) if grid in GRID_PREFERENCE else len(GRID_PREFERENCE)


def select_results(results_root: Path) -> list[tuple[Path, dict[str, Any], Optional[set[str]]]]:
    """Per device folder and op, the result file of the most complete grid, devices in name order,
    as (path, data, rows' ops to show or None for all). Where that grid is partial (a deadline cut
    it short), a coarser grid follows with the rows of the ops (losses) the partial one lacks. A run
    of some of the grid's dtypes only (``meta["dtype_subset"]``: its own file, e.g. a bf16 run at a
    later commit than the fp32 grid) is selected as well, and the whole grid's rows of those dtypes
    are left out of the tables (its data is a copy without them)."""
    selected = []
    for device_dir in sorted(path for path in results_root.iterdir() if path.is_dir()):
        by_kind: dict[tuple[str, tuple[str, ...]], list[tuple[Path, dict[str, Any]]]] = {}
        for path, data in load_results(device_dir):
            kind = (data["meta"].get("op", path.stem), tuple(data["meta"].get("dtype_subset") or ()))
            by_kind.setdefault(kind, []).append((path, data))
        for op, subset in sorted(by_kind):
            ranked = sorted(by_kind[op, subset], key=lambda item: _grid_rank(item[1]))
            if not subset:  # the dtypes that runs of their own measured again
                redone = {dtype for other_op, other in by_kind if other_op == op for dtype in other}
                ranked = [(path, _without_dtypes(data, redone)) for path, data in ranked]
            best_path, best = ranked[0]
            selected.append((best_path, best, None))
            if best["meta"].get("interrupted"):
                covered = {row.get("op") for row in best["results"]}
                for path, data in ranked[1:]:
                    missing = {row.get("op") for row in data["results"]} - covered
                    if missing:
                        selected.append((path, data, missing))
                        covered |= missing
    return selected


def _without_dtypes(data: dict[str, Any], dtypes: set[str]) -> dict[str, Any]:
    """``data`` without its rows of ``dtypes`` (itself when it has none), the meta saying so."""
    if not any(row.get("dtype", "float32") in dtypes for row in data["results"]):
        return data
    meta = {**data["meta"], "dtypes_elsewhere": sorted(dtypes)}
    return {"meta": meta, "results": [row for row in data["results"] if row.get("dtype", "float32") not in dtypes]}


def table_peers(meta: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(the peers a result file compares with in its tables, {peer: label})."""
    return list(meta.get("table_peers", DEFAULT_TABLE_PEERS)), {**PEER_LABELS, **meta.get("peer_labels", {})}


def render_table(path: Path, data: dict[str, Any], only_ops: Optional[set[str]] = None) -> str:
    """``data``'s fwd+bwd rows as a markdown table; ``only_ops``: just those ops' rows (what a partial
    finer grid lacks)."""
    meta = data["meta"]
    versions = meta.get("versions", {})
    subset, elsewhere = meta.get("dtype_subset"), meta.get("dtypes_elsewhere")
    grid = (f"{meta['grid']} grid" + (f" ({', '.join(subset)} only)" if subset else "")
            + (f" (its {', '.join(elsewhere)} rows: see the {', '.join(elsewhere)}-only file)" if elsewhere else ""))
    heading = (f"**{meta['device_name']}** ({meta['device']}, {meta['threads']} threads): `{meta['op']}`, "
               f"{grid}, commit `{meta['git_commit'][:10]}`, torch {versions.get('torch')}, "
               f"`{path.parent.name}/{path.name}`"
               + (" — **partial grid** (the run hit its deadline; the cases below are complete)"
                  if meta.get("interrupted") else "")
               + (f" — only {', '.join(sorted(only_ops))}, which the partial grid above lacks" if only_ops else ""))
    peers, labels = table_peers(meta)
    extra = any(row.get("extra_seq_tensors") is not None for row in data["results"])
    on_device = {(row["case"], row["backend"]): row for row in data["results"] if row["pass"] == DEVICE_PASS}
    with_peak = any(row.get("pct_peak") is not None for row in on_device.values())
    header = ["case", "backend", meta.get("time_label", "fwd+bwd ms"), "vs reference",
              *(f"vs {labels.get(p, p)}" for p in peers),
              *(["device ms", "device vs reference", *(["device % peak"] if with_peak else [])] if on_device else []),
              "memory vs reference", *(["extra [T,B,C]"] if extra else [])]
    lines = [heading, "", f"| {' | '.join(header)} |", "|---|---|" + "---:|" * (len(header) - 2)]
    previous_case = None
    for row in data["results"]:
        if row["pass"] != "fwdbwd" or (only_ops is not None and row.get("op") not in only_ops):
            continue
        case = row["case"] if row["case"] != previous_case else ""  # the case once per group
        previous_case = row["case"]
        cells = [case, row["backend"], fmt_ms(row["median_ms"]), fmt_ratio(row.get("speedup_vs_reference")),
                 *(fmt_ratio(row.get(f"speedup_vs_{p}")) for p in peers),
                 *(device_cells(on_device.get((row["case"], row["backend"])), with_peak) if on_device else []),
                 fmt_ratio(row.get("mem_ratio_vs_reference"))]
        if extra:
            cells.append(fmt_extra(row.get("extra_seq_tensors")))
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", f"Speed-up: the baseline's median time over this one (above 1x is faster); reference: the "
                  f"`{meta.get('reference', 'torch')}` backend. Memory: "
                  f"{meta.get('memory_label', 'fwd+bwd peak')} over the reference's."
                  + (" Device: fwd+bwd timed as device work (back-to-back launches: the host's overhead hidden "
                     "where it is smaller than the device's), its speed-up"
                     + (" and its share of the bandwidth peak for the minimum traffic." if with_peak else ".")
                     if on_device else "")
                  + (" Extra: fwd+bwd peak memory beyond the student gradient, in [T,B,C] float32 tensors."
                     if extra else "")]
    notes = [note for note in meta.get("notes", []) if note.split(":")[0] in meta.get("peers", [])]
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines)


def _ratio_range(values: list[Optional[float]], of: Optional[int] = None) -> str:
    """``min-max (median)`` of the measured speed-ups or memory ratios among ``values`` (one value
    alone when they agree to the digits shown), a dash if none; ``of``: the number of cases, said when
    fewer were measured (e.g. torch.compile within its compile budget)."""
    measured = sorted(value for value in values if value is not None)
    if not measured:
        return "-"
    low, high = fmt_ratio(measured[0]), fmt_ratio(measured[-1])
    text = low if low == high else f"{low.removesuffix('x')}-{high} ({fmt_ratio(statistics.median(measured))})"
    return text + (f" ({len(measured)} of {of})" if of is not None and len(measured) < of else "")


def summary_rows(path: Path, data: dict[str, Any], only_ops: Optional[set[str]] = None) -> list[list[str]]:
    """One summary line per op, dtype and backend of ours in ``data``: its fwd+bwd speed-up over the
    reference and the table peers, and its memory relative to the reference, as ranges over the cases."""
    meta = data["meta"]
    peers, labels = table_peers(meta)
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in data["results"]:
        op = row.get("op", meta["op"])
        if row["pass"] == "fwdbwd" and row.get("kind") == "ours" and (only_ops is None or op in only_ops):
            grouped.setdefault((op, row.get("dtype", "float32"), row["backend"]), []).append(row)
    grid = (meta["grid"] + "".join(f" {name}" for name in meta.get("dtype_subset") or ())
            + (" (partial)" if meta.get("interrupted") and only_ops is None else ""))
    lines = []
    for (op, dtype, backend), rows in grouped.items():
        cases = len({row["case"] for row in rows})
        versus = "; ".join(
            f"{labels.get(peer, peer)} {_ratio_range([row.get(f'speedup_vs_{peer}') for row in rows], cases)}"
            for peer in peers if any(row.get(f"speedup_vs_{peer}") is not None for row in rows))
        lines.append([meta["device_name"], op, dtype, backend, f"{cases}, {grid}",
                      _ratio_range([row.get("speedup_vs_reference") for row in rows]), versus or "-",
                      _ratio_range([row.get("mem_ratio_vs_reference") for row in rows]),
                      f"`{path.parent.name}/{path.name}` ({meta['git_commit'][:7]})"])
    return lines


def render_summary(results_root: Path) -> str:
    """The README's table: :func:`summary_rows` of every selected result file."""
    lines = [row for path, data, only_ops in select_results(results_root)
             for row in summary_rows(path, data, only_ops)]
    if not lines:
        return f"_No benchmark results under `{results_root}`._"
    header = ["device", "op", "dtype", "backend", "cases, grid", "fwd+bwd vs reference", "vs peers",
              "memory vs reference", "results (commit)"]
    table = [f"| {' | '.join(header)} |", "|---|---|---|---|---|---:|---|---:|---|",
             *(f"| {' | '.join(line)} |" for line in lines)]
    legend = ("Ratios over the cases of a device's grid: min-max (median), each case measured in one run with its "
              "baselines. Speed-up: the baseline's time over ours (above 1x: we are faster); memory: our peak over the "
              "reference's (below 1x: we use less). Reference: the `torch` backend (train_step: our pure-PyTorch "
              "neurons and loss); train_step times a whole step (forward and backward). Every case: "
              "[benchmarks/RESULTS.md](benchmarks/RESULTS.md).")
    return "\n".join(table + ["", legend])


def render(results_root: Path) -> str:
    tables = [render_table(path, data, only_ops) for path, data, only_ops in select_results(results_root)]
    if not tables:
        return f"_No benchmark results under `{results_root}`._"
    return "\n\n".join(tables)


def render_examples(results_root: Path) -> Optional[str]:
    """The distillation example's accuracy tables (one per committed ``distill_*.json``), or None."""
    tables = []
    for path in sorted(results_root.glob("*/distill_*.json")):
        data = json.loads(path.read_text())
        meta, cfg = data["meta"], data["meta"]["config"]
        lines = [f"**{path.parent.name}**, `{meta['command']}` (commit `{(meta.get('git_commit') or '?')[:10]}`, "
                 f"{len(cfg['seeds'])} seeds, {cfg['epochs']} epochs, T={cfg['T']}, {meta['total_seconds']:.0f} s "
                 f"in all, `{path.parent.name}/{path.name}`): teacher (ANN) {100 * data['teacher_accuracy']:.2f}%",
                 "", "| method | test accuracy % (mean +- std) | vs no KD | s/epoch | peak MB |",
                 "|---|---:|---:|---:|---:|"]
        for row in data["summary"]:
            delta = "" if row["method"] == "none" or row["delta_vs_none"] is None else f"{100 * row['delta_vs_none']:+.2f}"
            mem = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.1f}"
            lines.append(f"| {row['method']} | {100 * row['accuracy_mean']:.2f} +- {100 * row['accuracy_std']:.2f} | "
                         f"{delta} | {row['seconds_per_epoch']:.3f} | {mem} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) if tables else None


def replace_between_markers(text: str, block: str, source: str, markers=(START_MARKER, END_MARKER)) -> str:
    """``text`` with everything between the start and end markers replaced by ``block``."""
    start_marker, end_marker = markers
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"{source}: needs the markers {start_marker} and then {end_marker} around the "
                         f"table; found start: {start >= 0}, end: {end >= 0}"
                         + (", but in the wrong order" if 0 <= end < start else ""))
    return f"{text[:start + len(start_marker)]}\n{block}\n{text[end:]}"


TABLES_OUT = BENCH_DIR / "RESULTS.md"
TABLES_HEADING = ("# Benchmark results, every case\n\nRendered from `benchmarks/results/<device>/` by "
                  "`python benchmarks/render_readme_table.py --write README.md` (do not edit by hand); the README's "
                  "Performance section summarises them and says where we are behind.\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="folder holding one folder of result files per device (default: benchmarks/results)")
    parser.add_argument("--summary", action="store_true", help="print the README's summary instead of the full tables")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help=f"replace the text between {START_MARKER} and {END_MARKER} in FILE with the summary, "
                             "and write the full tables to --tables-out, instead of printing")
    parser.add_argument("--tables-out", type=Path, default=TABLES_OUT,
                        help="with --write: the file of the full tables (default: benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)

    if args.write is None:
        print(render_summary(args.results) if args.summary else render(args.results))
        return 0
    try:
        updated = replace_between_markers(args.write.read_text(), render_summary(args.results), str(args.write))
        examples = render_examples(args.results)
        if examples is not None and EXAMPLE_MARKERS[0] in updated:
            updated = replace_between_markers(updated, examples, str(args.write), EXAMPLE_MARKERS)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.write.write_text(updated)
    args.tables_out.write_text(f"{TABLES_HEADING}\n{render(args.results)}\n")
    print(f"updated the performance summary in {args.write} and the full tables in {args.tables_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
