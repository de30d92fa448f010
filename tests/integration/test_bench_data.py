"""`vitlab bench data` in quick mode: both sides run in one invocation and the ratio is theirs."""

import json

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
    for key in ("ray_data_images_per_s", "torch_dataloader_images_per_s", "ratio", "prepare_s", "settings"):
        assert key in report
    assert report["ray_data_images_per_s"] > 0 and report["torch_dataloader_images_per_s"] > 0
    expected = report["ray_data_images_per_s"] / report["torch_dataloader_images_per_s"]
    assert abs(report["ratio"] - expected) < 0.01 * expected + 1e-3
    assert report["settings"]["train_images"] == 16 and report["settings"]["max_side"] == 48
    assert "ratio (vitlab / seed)" in proc.stdout
