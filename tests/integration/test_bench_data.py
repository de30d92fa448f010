"""`vitlab bench data` in quick mode: the ceiling, the seed's DataLoader on the original and on the shards' bytes,
and the Ray Data pipeline run in one invocation, and the ratios are theirs."""

import json

import pytest

from tests.support.cli import run_cli


def test_bench_data_quick(ray_session, tmp_path):
    src = tmp_path / "synth"
    made = run_cli("data", "synth", "--out", src, "--classes", "2", "--per-class", "8", "--size", "64x48")
    assert made.returncode == 0, made.stderr
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "data", src, "--image-size", "32", "--batch-size", "4", "--seconds", "2",
                   "--max-side", "48", "--output-json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rates = ("ray_data_images_per_s", "torch_dataloader_images_per_s", "torch_dataloader_same_bytes_images_per_s",
             "ceiling_images_per_s", "ray_data_per_epoch_images_per_s")
    assert all(report[key] > 0 for key in rates), report
    ray_rate = report["ray_data_images_per_s"]
    for ratio, base in (("ratio", "torch_dataloader_images_per_s"), ("share_of_ceiling", "ceiling_images_per_s"),
                        ("ratio_same_bytes", "torch_dataloader_same_bytes_images_per_s")):
        expected = ray_rate / report[base]
        assert abs(report[ratio] - expected) < 0.01 * expected + 1e-3, (ratio, report)
    for ratio, base in (("per_epoch_share_of_ceiling", "ceiling_images_per_s"),
                        ("per_epoch_ratio_same_bytes", "torch_dataloader_same_bytes_images_per_s")):
        expected = report["ray_data_per_epoch_images_per_s"] / report[base]
        assert abs(report[ratio] - expected) < 0.01 * expected + 1e-3, (ratio, report)
    settings = report["settings"]
    assert settings["train_images"] == 16 and settings["max_side"] == 48
    assert report["ceiling_images_per_s"] == pytest.approx(report["ceiling_per_core_images_per_s"]
                                                           * settings["ceiling_cores"], rel=0.01)
    assert settings["cores"] >= 1 and len(settings["load_avg_1m"]) == 2
    assert "(d)/(c) same bytes" in proc.stdout and "ratio (vitlab / seed)" in proc.stdout
