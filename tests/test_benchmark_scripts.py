"""Benchmark scripts no other test runs still run: benchmarks/tune_triton.py --smoke takes its
every path (each sweep, the result check, the JSON) on the CPU through Triton's interpreter, so the
script a GPU session relies on cannot rot between GPU sessions; benchmarks/ab_kernels.py --smoke
compares the built extension with itself; benchmarks/ab_neuron_pairs.py --quick times the two
neuron kernel pairs; benchmarks/ab_env.py --smoke times one loss with and without an environment
setting."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_tune_triton_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", "from snnkd_fast._triton_interpreter_probe import "
                            "interpreter_problem; print(interpreter_problem())"],
                           capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr[-4000:]
    if probe.stdout.strip():  # e.g. the GPU image: Triton 3.6 (torch 2.11's) with NumPy 2.5
        pytest.skip(probe.stdout.strip())
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "tune_triton.json").read_text())
    sweeps = {row["sweep"].split(":")[1].strip() for row in data["results"]}
    assert sweeps == {"row kernels", "HTA teacher", "BLOCK, NUM_WARPS"}, sweeps
    assert all(row.get("same_result_as_first", True) for row in data["results"]), data["results"]


def test_ab_kernels_smoke(tmp_path):
    """benchmarks/ab_kernels.py, comparing the built extension with itself on its smallest shape:
    the alternating child processes, the aggregation and the result files."""
    import snnkd_fast

    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")
    so = next((ROOT / "snnkd_fast").glob("_C*.so"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_kernels.py"), "--base-so", str(so),
                             "--smoke", "--ops", "losses,neurons", "--name", "ab_smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "ab_smoke.json").read_text())
    assert {row["op"] for row in data["results"]} == {"per_timestep_kl", "tser_loss", "hta_kl", "nld_loss",
                                                      "lif_sigmoid", "lif_atan", "plif_sigmoid"}
    assert all(row["base_fwd_us"] > 0 and row["new_bwd_us"] > 0 for row in data["results"])
    assert (tmp_path / "ab_smoke.csv").exists()
    # plot.py, run over a results folder that holds such a file, skips it (it has no grid to plot)
    plotted = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert plotted.returncode == 0, plotted.stderr[-4000:]
    assert not list(tmp_path.glob("*.png"))


def test_ab_neuron_pairs_smoke(tmp_path):
    """benchmarks/ab_neuron_pairs.py --quick (what run_gpu.sh --ab runs with --device cuda): both
    pairs timed on every pass, their bytes and kept bytes, the result files."""
    import snnkd_fast

    if not snnkd_fast.backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_neuron_pairs.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "ab_neuron_pairs.json").read_text())
    assert [row["pass"] for row in data["results"]] == ["fwd", "bwd", "fwdbwd"]
    for row in data["results"]:
        assert row["saved_h_ms"] > 0 and row["lean_ms"] > 0 and row["speedup_lean_vs_saved_h"] > 0
        assert row["lean_bytes_min"] < row["saved_h_bytes_min"] or row["pass"] == "bwd"
        assert row["lean_kept_bytes"] == 0 < row["saved_h_kept_bytes"]
    assert (tmp_path / "ab_neuron_pairs.csv").exists()


def test_ab_env_smoke(tmp_path):
    """benchmarks/ab_env.py --smoke (what run_gpu.sh --ab runs with --device cuda): the two paths'
    processes in turn, the aggregation and the result files."""
    import snnkd_fast

    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_env.py"), "--smoke", "--rounds", "1",
                             "--budget-s", "0.02", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "base (SNNKD_CUDA_KD_NO_FORWARD_GRAD=1)" in result.stdout and "new (as built)" in result.stdout
    data = json.loads((tmp_path / "ab_env.json").read_text())
    assert data["meta"]["base_env"] == "SNNKD_CUDA_KD_NO_FORWARD_GRAD=1"
    assert [row["case"] for row in data["results"]] == ["per_timestep_kl 2x3x40 float32"]
    assert all(row["base_ms"] > 0 and row["new_ms"] > 0 for row in data["results"])
    assert (tmp_path / "ab_env.csv").exists()


def test_kernel_breakdown_smoke(tmp_path):
    """benchmarks/kernel_breakdown.py --smoke (what run_gpu.sh --breakdown runs with --device cuda): a
    loss and the neuron profiled on the CPU, our C++ ops among the entries, shares that add up."""
    import snnkd_fast

    if not (snnkd_fast.backends()["cpp"] and snnkd_fast.backends("kd")["cpp"]):
        pytest.skip("the C++ extension is not built")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_breakdown.py"), "--smoke",
                             "--iterations", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "kernel_breakdown.json").read_text())
    rows = data["results"]
    assert {row["case"].split()[0] for row in rows} == {"hta_kl", "lif_multistep"}
    for case in {row["case"] for row in rows}:
        kernels = {row["kernel"]: row for row in rows if row["case"] == case}
        assert any(name.startswith("snnkd_fast::") for name in kernels), sorted(kernels)
        assert abs(sum(row["share"] for row in kernels.values()) - 1.0) < 1e-6
        assert all(row["us_per_iter"] > 0 and row["calls_per_iter"] > 0 for row in kernels.values())
    # Beside the grids in a results folder (run_gpu.sh --breakdown), it is no grid: plot.py and the
    # README table skip it (plot.py once failed on its rows, which have no pass).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import load_results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert load_results(tmp_path) == []
    # --variant (run_gpu.sh's second, SNNKD_CUDA_KD_UNPACKED=1 run): its own file, named in the meta
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_breakdown.py"), "--smoke",
                             "--iterations", "1", "--out", str(tmp_path), "--variant", "unpacked"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "SNNKD_CUDA_KD_UNPACKED": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((tmp_path / "kernel_breakdown_unpacked.json").read_text())["meta"]
    assert meta["variant"] == "unpacked" and meta["cuda_kd_unpacked"] == "1"


def test_bench_resume_keeps_measured_cases(tmp_path):
    """--resume (run_gpu.sh's second call after a deadline): the rows of the same commit's JSON are
    kept and their cases not measured again, only the missing ones are; a file from another commit is
    refused with a clear message rather than mixed into one table."""
    import snnkd_fast

    if not snnkd_fast.backends("kd")["cpp"]:
        pytest.skip("the C++ extension is not built")

    def bench(*args):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_losses.py"), "--quick", "--peers",
                               "none", "--out", str(tmp_path), "--sample-budget-s", "0.02", *args],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)

    path = tmp_path / "losses_quick.json"
    first = bench("--losses", "kd_kl")
    assert first.returncode == 0, first.stderr[-4000:]
    kept = json.loads(path.read_text())["results"]
    # per_timestep_kl's cases are new; kd_kl's are kept as they were (same median to the last digit)
    second = bench("--losses", "kd_kl,per_timestep_kl", "--resume")
    assert second.returncode == 0, second.stderr[-4000:]
    data = json.loads(path.read_text())
    assert data["meta"]["sample_budget_s"] == 0.02
    assert data["meta"]["resumed"]["rows"] == len(kept)
    assert data["results"][:len(kept)] == kept
    assert {row["op"] for row in data["results"][len(kept):]} == {"per_timestep_kl"}
    assert second.stdout.count("kd_kl 64x100 T=4 float32  [") == 0  # not measured again

    data["meta"]["git_commit"] = "0" * 40
    path.write_text(json.dumps(data))
    refused = bench("--losses", "kd_kl", "--resume")
    assert refused.returncode != 0
    assert "not resuming across runs of different builds" in refused.stderr + refused.stdout


def test_sample_budget_option_overrides_the_scripts_timer(monkeypatch):
    """--sample-budget-s (every benchmark script, run.py forwards it): the script's Timer gets that
    budget and a warm-up scaled alike, its other settings kept; without it the script's default."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parser = common.bench_parser("bench", "quick", ())
    cpu = torch.device("cpu")
    timer = common.sample_timer(parser.parse_args(["--sample-budget-s", "0.05"]), cpu, budget_s=0.1, warmup_s=0.03,
                                min_reps=7)
    assert (timer.budget_s, timer.warmup_s, timer.min_reps) == (0.05, pytest.approx(0.015), 7)
    default = common.sample_timer(parser.parse_args([]), cpu, budget_s=0.1, warmup_s=0.03)
    assert (default.budget_s, default.warmup_s) == (0.1, 0.03)
    for bad in ("0", "-0.1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--sample-budget-s", bad])
    forwarded = []

    class FakeBench:
        @staticmethod
        def main(argv):
            forwarded.append(argv)
            raise SystemExit(0)  # stop run.py before it plots

    original = run.importlib.import_module
    monkeypatch.setattr(run.importlib, "import_module",
                        lambda name: FakeBench if name.startswith("bench_") else original(name))
    with pytest.raises(SystemExit):
        run.main(["--only", "losses", "--sample-budget-s", "0.05"])
    assert forwarded and forwarded[0][-2:] == ["--sample-budget-s", "0.05"]


def test_loss_grid_filters_reach_bench_losses(monkeypatch):
    """run.py --losses/--dtypes go to bench_losses alone (a GPU session measuring what an earlier one
    did not reach, e.g. the bf16 cases of three losses); bench_losses' grid keeps only those dtypes,
    and refuses an unknown one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_losses
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    forwarded = {}

    def fake_module(name):
        class FakeBench:
            @staticmethod
            def main(argv):
                forwarded[name] = argv
                raise SystemExit(0)
        return FakeBench

    monkeypatch.setattr(run.importlib, "import_module", fake_module)
    for only in ("losses", "lif"):
        with pytest.raises(SystemExit):
            run.main(["--only", only, "--losses", "hta_kl,nld_loss", "--dtypes", "bfloat16"])
    assert forwarded["bench_losses"][-4:] == ["--losses", "hta_kl,nld_loss", "--dtypes", "bfloat16"]
    assert "--losses" not in forwarded["bench_lif"] and "--dtypes" not in forwarded["bench_lif"]

    cuda = torch.device("cuda")
    full = bench_losses.build_grid(cuda, False, ("hta_kl", "nld_loss"))
    bf16 = bench_losses.build_grid(cuda, False, ("hta_kl", "nld_loss"), ("bfloat16",))
    assert {case.dtype for case in full} == {torch.float32, torch.bfloat16}
    assert bf16 == [case for case in full if case.dtype == torch.bfloat16] and len(bf16) == 20
    with pytest.raises(SystemExit):
        bench_losses.parse_args(["--dtypes", "float16"])


def test_queued_timer_enqueues_back_to_back(monkeypatch):
    """Timer(queued=True), the device-time mode of benchmarks/tune_triton.py, checked without a GPU
    (fake CUDA events): per repetition setup, flush, start event, run, end event, with no
    synchronisation in between -- one before, one after -- and the samples read off the events."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    log, clock = [], [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.time = None

        def record(self):
            clock[0] += 1.0
            self.time = clock[0]
            log.append("record")

        def elapsed_time(self, end):
            return end.time - self.time

    class FakeFlush:
        def zero_(self):
            log.append("flush")

    def run(state):
        clock[0] += 2.5  # the "kernel" between the events
        log.append("run")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    timer = object.__new__(common.Timer)
    timer.device, timer.queued, timer._l2_flush = torch.device("cuda"), True, FakeFlush()
    samples = timer._queued_samples_ms(run, lambda: log.append("setup"), reps=3)
    assert samples == [3.5, 3.5, 3.5]
    assert log == ["sync"] + ["setup", "flush", "record", "run", "record"] * 3 + ["sync"]
    with pytest.raises(ValueError, match="CUDA device time"):
        common.Timer(torch.device("cpu"), budget_s=0.1, warmup_s=0.0, queued=True)


def test_run_gpu_script_parses_and_documents_its_options():
    """benchmarks/run_gpu.sh only runs on a GPU machine; here: bash accepts it, and --help prints the
    header that documents every option its argument loop takes."""
    script = ROOT / "benchmarks" / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=60).returncode == 0
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    options = {line.strip().split(")")[0] for line in script.read_text().splitlines()
               if line.strip().startswith("--") and ")" in line and ";;" in line}
    assert {"--resume", "--tune", "--ab", "--skip-build"} <= options, options
    for option in options - {"--"}:
        assert option.split("|")[0] in shown.stdout, option


def test_device_pass_flows_into_rows_tables_and_plots(tmp_path):
    """The GPU-only DEVICE_PASS (fwd+bwd as device work), checked without a GPU: time_passes adds it
    when given a device timer, pass_rows takes fwd+bwd's minimum traffic for it (the benchmarks'
    min_bytes know only fwd, bwd, fwdbwd), ratios, the case table, the README table and the plots
    show it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
        import plot
        import render_readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def fake_timer(ms):
        def timer(run, setup=lambda: None):
            run(setup())
            return common.Timing(ms, ms, ms, 10)
        return timer

    leaf = torch.ones(3, requires_grad=True)
    timings = common.time_passes(fake_timer(2.0), lambda: (leaf * 2).sum(), lambda out: out.backward(), leaf,
                                 device_timer=fake_timer(0.5))
    assert set(timings) == {"fwd", "bwd", "fwdbwd", common.DEVICE_PASS}
    assert set(common.time_passes(fake_timer(2.0), lambda: (leaf * 2).sum(), lambda out: out.backward(), leaf)) \
        == {"fwd", "bwd", "fwdbwd"}

    traffic = {"fwd": 100, "bwd": 200, "fwdbwd": 300}
    rows = []
    for backend, scale in (("torch", 2.0), ("cuda", 1.0)):
        rows += common.pass_rows(lambda pass_, backend=backend: {"op": "kl", "case": "kl 1x2", "backend": backend,
                                                                 "kind": "ours", "pass": pass_},
                                 {name: common.Timing(t.median_ms * scale, 0, 0, 1) for name, t in timings.items()},
                                 1000, traffic.__getitem__, 1e9)
    common.add_ratios(rows, "torch", ())
    device_rows = {row["backend"]: row for row in rows if row["pass"] == common.DEVICE_PASS}
    assert device_rows["cuda"]["bytes_min"] == 300 and device_rows["cuda"]["speedup_vs_reference"] == 2.0
    table = common.case_table(rows, {})
    assert "device ms" in table and "0.500" in table

    data = {"meta": {"device_name": "GPU", "device": "cuda", "threads": 1, "op": "kl", "grid": "quick",
                     "git_commit": "0" * 40, "table_peers": [], "reference": "torch"}, "results": rows}
    rendered = render_readme_table.render_table(tmp_path / "kl_quick.json", data)
    assert "| device ms | device vs reference | device % peak |" in rendered
    assert "| 0.500 | 2.00x |" in rendered
    (tmp_path / "kl_quick.json").write_text(json.dumps(data))
    plot.main([str(tmp_path)])
    assert list(tmp_path.glob("*.png"))


def test_bench_train_step_smoke(tmp_path):
    """benchmarks/bench_train_step.py on a shrunken quick case (batch 2, width 4): every configuration
    the CPU has times a step, each records its first loss, and ours computes the reference's loss
    (same weights and data from one seed); the README renderer labels the step's time."""
    import snnkd_fast

    if not snnkd_fast.backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--quick", "--batch", "2",
                           "--width", "4", "--out", str(tmp_path), "--sample-budget-s", "0.01"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "train_step_quick.json").read_text())
    steps = {row["backend"]: row for row in data["results"] if row["pass"] == "fwdbwd"}
    assert {"torch", "cpp", "cpp+eager_loss"} <= set(steps)
    assert all(row["case"] == "per_timestep_kl B=2 T=4 w=4 C=100 32x32" for row in steps.values())
    for name, row in steps.items():
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] is not None, name
        assert row["loss_abs_diff_vs_reference"] <= 1e-5 * abs(steps["torch"]["loss"]), name
        assert steps["torch"]["kd_loss"] > 0.1 and row["kd_rel_diff_vs_reference"] <= 1e-5, name
    # our neurons are SpikingJelly's bit for bit: with the reference's loss, the same loss exactly
    assert steps["cpp+eager_loss"]["loss"] == steps["torch"]["loss"]
    assert steps["cpp"]["speedup_vs_reference"] == pytest.approx(
        steps["torch"]["median_ms"] / steps["cpp"]["median_ms"])

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import render_readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rendered = render_readme_table.render_table(tmp_path / "train_step_quick.json", data)
    assert "Memory: the step's peak over the reference's." in rendered
    # On a GPU the step has a device-time pass too, but no roofline (no pct_peak): its table shows
    # device ms and speed-up without a "% peak" column (rendering once failed on the missing key).
    on_gpu = json.loads(json.dumps(data))
    on_gpu["results"] += [dict(row, **{"pass": "fwdbwd_device"}) for row in steps.values()]
    rendered = render_readme_table.render_table(tmp_path / "train_step_quick.json", on_gpu)
    header = next(line for line in rendered.splitlines() if line.startswith("| case"))
    assert "device ms" in header and "% peak" not in header
    assert all(line.count("|") == header.count("|") for line in rendered.splitlines() if line.startswith("| "))

    # mixed precision: the step under bf16 autocast (our ops get bf16 logits and activations)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--quick", "--batch", "2",
                           "--width", "4", "--amp", "bfloat16", "--peers", "none", "--out", str(tmp_path / "amp"),
                           "--sample-budget-s", "0.01"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "amp" / "train_step_quick.json").read_text())["results"]
    steps = {row["backend"]: row for row in rows if row["pass"] == "fwdbwd"}
    assert all(row["dtype"] == "bfloat16" and row["case"].endswith("amp bfloat16") for row in steps.values())
    assert steps["cpp+eager_loss"]["loss"] == steps["torch"]["loss"]
    assert steps["cpp"]["kd_rel_diff_vs_reference"] <= 1e-5


def test_readme_summary_and_full_tables(tmp_path):
    """render_readme_table.py --write: the README gets one summary line per op, dtype and backend of
    ours (min-max (median) over the cases; a peer measured on fewer cases says on how many), and the
    full per-case tables go to --tables-out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import render_readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(case, backend, kind, dtype, ms, peer_ms=None, mem=1.0):
        return {"op": "kl", "case": case, "backend": backend, "kind": kind, "pass": "fwdbwd", "dtype": dtype,
                "median_ms": ms, "speedup_vs_reference": 4.0 / ms, "speedup_vs_compiled": peer_ms and peer_ms / ms,
                "mem_ratio_vs_reference": mem, "peak_mem_bytes": 100}

    rows = [row("a", "torch", "reference", "float32", 4.0), row("a", "cuda", "ours", "float32", 1.0, 2.0, 0.3),
            row("b", "torch", "reference", "float32", 4.0), row("b", "cuda", "ours", "float32", 2.0, None, 0.5),
            row("c", "torch", "reference", "float32", 4.0), row("c", "cuda", "ours", "float32", 0.5, 1.0, 0.4),
            row("d", "cuda", "ours", "bfloat16", 0.8)]
    data = {"meta": {"device_name": "GPU", "device": "cuda", "threads": 1, "op": "kd_losses", "grid": "full",
                     "git_commit": "a" * 40, "table_peers": ["compiled"], "peer_labels": {"compiled": "torch.compile"}},
            "results": rows}
    device_dir = tmp_path / "results" / "gpu"
    device_dir.mkdir(parents=True)
    (device_dir / "losses_full.json").write_text(json.dumps(data))
    summary = render_readme_table.render_summary(tmp_path / "results")
    assert ("| GPU | kl | float32 | cuda | 3, full | 2.00-8.00x (4.00x) | torch.compile 2.00x (2 of 3) | "
            "0.30-0.50x (0.40x) | `gpu/losses_full.json` (aaaaaaa) |") in summary
    assert "| GPU | kl | bfloat16 | cuda | 1, full | 5.00x | - | 1.00x |" in summary

    readme, tables = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text("intro\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\noutro\n")
    assert render_readme_table.main(["--results", str(tmp_path / "results"), "--write", str(readme),
                                     "--tables-out", str(tables)]) == 0
    assert summary in readme.read_text() and "old" not in readme.read_text()
    full = tables.read_text()
    assert "| a | torch | 4.000 | 1.00x |" in full and "|  | cuda | 1.000 | 4.00x | 2.00x |" in full


def test_a_run_of_some_dtypes_sits_beside_the_whole_grid(tmp_path):
    """bench_losses.py --dtypes bfloat16 on a GPU (the bf16 half of a grid a deadline cut short, at a
    later commit): its file is losses_full_bfloat16.json, not losses_full.json (which it would have
    replaced), --resume reads that file only, and the README gets both tables, the whole grid's
    without its bf16 rows (the cases the deadline let it reach)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
        import render_readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert common.result_name("losses", {"grid": "full"}) == "losses_full"
    assert common.result_name("losses", {"grid": "full", "dtype_subset": None}) == "losses_full"
    assert common.result_name("losses", {"grid": "full", "dtype_subset": ["bfloat16"]}) == "losses_full_bfloat16"

    def result(commit, dtypes, subset, ours_ms=0.5):
        meta = {"device_name": "GPU", "device": "cuda", "threads": 1, "op": "kd_losses", "grid": "full",
                "git_commit": commit * 40, "dtype_subset": subset}
        rows = [{"op": "kl", "case": f"kl {dtype}", "backend": backend, "kind": kind, "pass": "fwdbwd",
                 "dtype": dtype, "median_ms": ms, "speedup_vs_reference": 2.0 / ms}
                for dtype in dtypes for backend, kind, ms in (("torch", "reference", 2.0), ("cuda", "ours", ours_ms))]
        return {"meta": meta, "results": rows}

    device_dir = tmp_path / "results" / "gpu"
    device_dir.mkdir(parents=True)
    whole, bf16 = result("a", ["float32", "bfloat16"], None), result("b", ["bfloat16"], ["bfloat16"], 0.25)
    common.write_results(device_dir, "losses", whole["meta"], whole["results"], ["case"], 0.0)
    common.write_results(device_dir, "losses", bf16["meta"], bf16["results"], ["case"], 0.0)
    assert sorted(path.name for path in device_dir.glob("*.json")) == ["losses_full.json",
                                                                       "losses_full_bfloat16.json"]
    selected = render_readme_table.select_results(tmp_path / "results")
    assert [(path.name, only_ops) for path, _, only_ops in selected] == [("losses_full.json", None),
                                                                         ("losses_full_bfloat16.json", None)]
    assert [row["dtype"] for row in selected[0][1]["results"]] == ["float32"] * 2  # a copy: the file keeps all
    assert len(json.loads((device_dir / "losses_full.json").read_text())["results"]) == 4
    summary = render_readme_table.render_summary(tmp_path / "results")
    assert "| GPU | kl | float32 | cuda | 1, full | 4.00x |" in summary
    assert "| GPU | kl | bfloat16 | cuda | 1, full bfloat16 | 8.00x |" in summary
    assert "| GPU | kl | bfloat16 | cuda | 1, full |" not in summary
    tables = render_readme_table.render(tmp_path / "results")
    assert "full grid (its bfloat16 rows: see the bfloat16-only file), commit `aaaaaaaaaa`" in tables
    assert "full grid (bfloat16 only), commit `bbbbbbbbbb`" in tables

    for run in (whole, bf16):  # --resume of each run keeps its own file's rows
        kept = common.resumed_rows(device_dir, "losses", {**run["meta"], "failures": {}, "skipped": {}})
        assert kept == run["results"]


def test_record_case_error_fails_ours_and_skips_peers(capsys):
    """A benchmark's implementation that raises on a case: ours is a recorded failure (the run then
    exits 1), a peer's is skipped with its reason."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    meta = {"failures": {}, "skipped": {}}
    common.record_case_error(meta, "ours", "cpp", "case 1", RuntimeError("boom"))
    common.record_case_error(meta, "peer", "spikingjelly", "case 1", ValueError("no cupy"))
    assert meta["failures"] == {"cpp @ case 1": "RuntimeError: boom"}
    assert meta["skipped"] == {"spikingjelly @ case 1": "ValueError: no cupy"}
    assert "cpp FAILED on case 1" in capsys.readouterr().out


def test_ncu_cases_run_and_summarize(tmp_path):
    """benchmarks/ncu_cases.py (run_gpu.sh --ncu): every case's fwd+bwd runs (tiny shapes, CPU), and the
    summary reads Nsight Compute's details CSV (``ncu --import R --csv --page details --print-units
    base``: ==PROF== lines first, one row per kernel and metric) into per-kernel figures: instructions
    per element of the case, the largest stall reasons first."""
    import snnkd_fast

    if not (snnkd_fast.backends()["cpp"] and snnkd_fast.backends("kd")["cpp"]):
        pytest.skip("the C++ extension is not built")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ncu_cases
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ncu_cases.CASES:
        ncu_cases.run_case(name, torch.device("cpu"), smoke=True)
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
    rows = [("0", "hta_split_search_kernel(float)", "Command line profiler metrics", "smsp__thread_inst_executed.sum",
             "1,024,000,000"),
            ("0", "hta_split_search_kernel(float)", "Command line profiler metrics", "gpu__time_duration.sum", "32000"),
            ("0", "hta_split_search_kernel(float)", "Command line profiler metrics",
             "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "3.5"),
            ("0", "hta_split_search_kernel(float)", "Command line profiler metrics",
             "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "7.25"),
            ("0", "hta_split_search_kernel(float)", "Occupancy", "Achieved Occupancy", "61.5"),
            ("1", "kd_forward_kernel(float)", "LaunchStats", "Registers Per Thread", "64")]
    lines = ["==PROF== Connected to process 1", header] + [
        ",".join(f'"{v}"' for v in (kid, "1", "python3", "host", kname, "1", "7", "(256, 1, 1)", "(384, 1, 1)",
                                    "0", "9.0", section, metric, "", value)) for kid, kname, section, metric, value in rows]
    (tmp_path / "ncu_hta_head_64x128000.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "ncu_not_a_case.csv").write_text(header + "\n")
    summary = ncu_cases.summarize(tmp_path)
    assert list(summary) == ["hta_head_64x128000"]
    search, forward = summary["hta_head_64x128000"]
    assert search["kernel"] == "hta_split_search_kernel" and forward["registers"] == 64
    assert search["us"] == 32.0 and search["achieved_occupancy_pct"] == 61.5
    assert search["thread_inst_per_element"] == 1_024_000_000 / (4 * 64 * 128000)
    assert search["top_stalls"] == [("barrier", 7.25), ("long_scoreboard", 3.5)]
