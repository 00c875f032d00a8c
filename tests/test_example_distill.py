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


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        distill.parse_args(["--methods", "none,magic"])


def test_cifar10_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        distill.load_cifar10(tmp_path)
