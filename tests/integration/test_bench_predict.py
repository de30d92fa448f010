"""`vitlab bench predict --quick`: Ray Data batch predict beside the single-process predict (session Ray)."""

import json

from tests.support.cli import run_cli


def test_bench_predict_quick_reports_both_sides_and_the_ratio(ray_session, tmp_path):
    out = tmp_path / "predict.json"
    proc = run_cli("bench", "predict", "--quick", "--images", "40", "--output-json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["single_process_images_per_s"] > 0 and report["ray_data_images_per_s"] > 0
    assert report["ratio"] == round(report["ray_data_images_per_s"] / report["single_process_images_per_s"], 3)
    assert report["ray_start_s"] >= 0 and set(report["clocks"]) == {"single_process", "ray_data", "ray_start"}
    assert report["top1_agreement"] == 1.0  # the same model on the same bytes names the same classes
    s = report["settings"]
    assert (s["images"], s["quick"], s["rounds"]) == (40, True, 1) and s["cores"] >= 1
    assert len(s["load_avg_1m"]) == 2 and s["workers"] >= 1
    assert "Ray Data predict --out" in proc.stdout and "single-process predict" in proc.stdout
