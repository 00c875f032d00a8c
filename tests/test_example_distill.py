"""The end-to-end distillation example runs in its smoke configuration: every method trains a
student on real (digits) images, or on synthesised ones for STARS, and the report is written."""
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from snnkd_fast.examples import distill  # noqa: E402


def test_smoke_run_writes_the_report(tmp_path):
    result = distill.main(["--smoke", "--out", str(tmp_path)])
    methods = [row["method"] for row in result["summary"]]
    assert methods == list(distill.METHODS)
    for row in result["summary"]:
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["seconds_per_epoch"] > 0
    saved = json.loads((tmp_path / "distill_digits.json").read_text())
    assert saved["summary"] == result["summary"] and saved["meta"]["config"]["epochs"] == 1
    assert (tmp_path / "distill_digits.png").stat().st_size > 0
    assert "teacher (ANN) test accuracy" in (tmp_path / "distill_digits.txt").read_text()


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(["--methods", "none,magic"])
    assert "unknown method(s) ['magic']" in capsys.readouterr().err


def test_cifar10_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        distill.load_cifar10(tmp_path)


def test_cifar10_loader_reads_the_python_batches(tmp_path):
    """The loader reads the standard python-pickle batches with numpy (here tiny synthetic ones in
    the same format): shapes, labels and the per-channel normalisation."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    data = distill.load_cifar10(tmp_path)
    assert data.name == "cifar10" and data.num_classes == 10
    assert tuple(data.x_train.shape) == (20, 3, 32, 32) and tuple(data.x_test.shape) == (3, 3, 32, 32)
    assert data.y_train.dtype == data.y_test.dtype == __import__("torch").int64
    means = data.x_train.mean(dim=(0, 2, 3))
    assert means.abs().max() < 1e-5  # normalised with the training images' channel statistics
