"""Bad input through the real CLI entry point (cli.main), in this process: one line on stderr naming the
file or key, exit code 2, nothing written. Each of these fails before a Ray runtime or a model is needed."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import JOB
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.data import jpeg_bytes


@pytest.mark.parametrize("make_source, message", [
    (lambda p: p / "missing", "source not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "unrecognised source layout"),
    (lambda p: ((p / "loose").mkdir(), (p / "loose" / "x.JPEG").write_bytes(b"x"))[0] or p / "loose",
     "unrecognised source layout"),
])
def test_prepare_bad_source(tmp_path, make_source, message):
    assert_one_line_error(run_cli("data", "prepare", make_source(tmp_path), "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


def test_prepare_missing_uri_source_and_existing_out(tmp_path):
    ran = run_cli("data", "prepare", "file:///nonexistent", "--out", tmp_path / "o")
    assert_one_line_error(ran, "file:///nonexistent: source not found")
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    assert_one_line_error(run_cli("data", "prepare", "digits", "--out", tmp_path / "o"), "--overwrite")
    assert_one_line_error(run_cli("data", "prepare", "digits", "--out", tmp_path / "p", "--val-fraction",
                                  "1.5"), "--val-fraction 1.5: expected a fraction in [0, 1)")
    assert_one_line_error(run_cli("data", "prepare", "digits", "--out", tmp_path / "p", "--quality",
                                  "101"), "--quality 101: expected 1-100")


def test_format_choices_come_from_the_readers(tmp_path):
    ran = run_cli("data", "prepare", "digits", "--out", tmp_path / "o", "--format", "coco")
    assert ran.returncode == 2 and "invalid choice: 'coco'" in ran.stderr
    assert "'imagenet', 'folders', 'tiny_imagenet', 'cifar100', 'digits'" in ran.stderr


def test_synth_tree_is_textured_jpegs(tmp_path):
    out = tmp_path / "synth"
    ran = run_cli("data", "synth", "--out", out, "--classes", "2", "--per-class", "2", "--size", "64x48")
    assert ran.returncode == 0, ran.stderr
    files = sorted((out / "train").rglob("*.JPEG"))
    assert len(files) == 4 and len(list((out / "val").rglob("*.JPEG"))) == 2
    arr = np.asarray(Image.open(files[0]))
    assert arr.shape == (48, 64, 3) and arr.std() > 10
    assert_one_line_error(run_cli("data", "synth", "--out", out, "--classes", "2", "--per-class", "2"),
                          "already exists and is not empty")


def test_train_without_a_dataset_fails_before_ray(tmp_path):
    ran = run_cli("train", JOB, f"data.path={tmp_path}/none")
    assert_one_line_error(ran, f"{tmp_path}/none: no manifest.json")


def test_submit_checks_the_command_before_anything_leaves(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing answers
    typo = run_cli("submit", "--address", nowhere, "--", "trian", "jobs/digits_vit.yaml")
    assert typo.returncode == 2 and "invalid choice: 'trian'" in typo.stderr
    assert_one_line_error(run_cli("submit", "--address", nowhere, "--", "train", "jobs/digits_vit.yaml",
                                  "optim.lrr=1"), "did you mean optim.lr")
    assert_one_line_error(run_cli("submit", "--address", nowhere, "--", "submit", "--", "train", "x.yaml"),
                          "does not run as a job")
    assert_one_line_error(run_cli("submit", "--address", nowhere), "no command given")
    assert_one_line_error(run_cli("jobs", "list", "--address", nowhere), f"no Ray cluster answers at {nowhere}")


def test_bench_infer_unknown_model():
    assert_one_line_error(run_cli("bench", "infer", "--model", "vit_smal_patch16_224"),
                          "did you mean vit_small_patch16_224")
    ran = run_cli("bench", "infer", "--runtime", "tensorrt")
    assert ran.returncode == 2 and "invalid choice: 'tensorrt'" in ran.stderr and "'onnxruntime_int8'" in ran.stderr


def test_model_paths_that_are_not_models(tmp_path):
    (tmp_path / "good.jpg").write_bytes(jpeg_bytes(1, 0))
    assert_one_line_error(run_cli("predict", tmp_path / "no" / "model.pt", tmp_path / "good.jpg"),
                          "no such file or directory")
    assert_one_line_error(run_cli("export", tmp_path, "--out", tmp_path / "o"),
                          "a directory without model.onnx")
    (tmp_path / "notes.pt").write_text("not a model")
    assert_one_line_error(run_cli("export", tmp_path / "notes.pt", "--out", tmp_path / "o"),
                          "not a PyTorch model file")
    ran = run_cli("export", tmp_path, "--out", tmp_path / "o", "--quantize", "int4")
    assert ran.returncode == 2 and "invalid choice: 'int4'" in ran.stderr
    assert not (tmp_path / "o").exists()


class _Touches:
    """Unpickled by a code-running loader, this creates the file: the proof that the loader ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_carries_code_runs_none(tmp_path):
    import torch

    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    proof = tmp_path / "code-ran"
    torch.save({"model": _Touches(proof), "epoch": 1}, ckpt / "state.pt")
    assert_one_line_error(run_cli("export", ckpt / "state.pt", "--out", tmp_path / "o"), "not a PyTorch model file")
    assert not proof.exists() and not (tmp_path / "o").exists()
