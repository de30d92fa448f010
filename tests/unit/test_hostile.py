"""Hostile and malformed input: one line on stderr naming the file or key, exit code 2, nothing run, nothing
written, nothing deleted that vitlab did not write. Every input vitlab reads has a row in BAD_INPUT: add one
with each new input."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from tests.support import JOB, TINY
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.data import jpeg_bytes, make_cifar100, make_class_tree, make_tiny_imagenet, png_bomb
from vitlab import outdir
from vitlab.data.prepare import EncodeOptions, Rejected, encode_image
from vitlab.deploy.onnx import check_out
from vitlab.errors import UserError
from vitlab.redact import RedactFilter, redact


def _manifest(root: Path, data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def _val_only_manifest(t: Path) -> list:
    d = _manifest(t / "ds", {"classes": ["a"], "splits": {"val": {"rows": 1, "shards": []}}})
    return ["train", JOB, f"data.path={d}"]


def _escaping_shard(t: Path) -> list:
    split = {"rows": 1, "shards": [{"file": "../../etc/passwd", "rows": 1}]}
    d = _manifest(t / "ds", {"classes": ["a"], "splits": {"train": split, "val": split}})
    return ["train", JOB, f"data.path={d}"]


def _non_utf8_job(t: Path) -> list:
    (t / "job.yaml").write_bytes(b"train:\n  epochs: \xff\xfe\n")
    return ["train", t / "job.yaml"]


def _space(t: Path, text: str) -> Path:
    (t / "space.yaml").write_text(text)
    return t / "space.yaml"


def _malformed_cifar(t: Path) -> list:
    src = make_cifar100(t / "cifar", n_train=2, n_test=2, classes=2)
    (src / "test").write_bytes(pickle.dumps({"data": [1, 2, 3], "fine_labels": [0]}))
    return ["data", "prepare", src, "--out", t / "out"]


def _wnids_escape(t: Path) -> list:
    src = make_tiny_imagenet(t / "tiny", ["n01", "n02"])
    (src / "wnids.txt").write_text("n01\n../../x\n")
    return ["data", "prepare", src, "--out", t / "out"]


def _class_folder_with_newline(t: Path) -> list:
    src = make_class_tree(t / "src", ["a", "b\nc"], per_class=2, split_dirs=False)
    return ["data", "prepare", src, "--out", t / "out"]


# a valid manifest: the folder looks like a dataset vitlab wrote, and is still refused
LOOKS_PREPARED = {"classes": ["a"], "splits": {s: {"rows": 0, "shards": []} for s in ("train", "val")}}


def _overwrite_source(t: Path) -> list:
    src = make_class_tree(t / "src", ["a", "b"], per_class=2, split_dirs=False)
    _manifest(src, LOOKS_PREPARED)
    return ["data", "prepare", src, "--out", src, "--overwrite"]


def _overwrite_parent_of_source(t: Path) -> list:
    make_class_tree(t / "home" / "src", ["a", "b"], per_class=2, split_dirs=False)
    _manifest(t / "home", LOOKS_PREPARED)
    return ["data", "prepare", t / "home" / "src", "--out", t / "home", "--overwrite"]


def _overwrite_user_folder(t: Path) -> list:
    (t / "thesis").mkdir()
    (t / "thesis" / "chapter1.tex").write_text("months of work")
    return ["data", "prepare", "digits", "--out", t / "thesis", "--overwrite"]


def _text_as_model(t: Path) -> list:
    (t / "notes.txt").write_text("not a model\n")
    return ["export", t / "notes.txt", "--out", t / "out"]


def _finetune_job(t: Path, init_from: str) -> list:
    """A train command that passes every other check (a digits-shaped manifest, a tracking store outside
    tmp_path) and fails on model.init_from, before Ray starts."""
    split = {"rows": 1000, "shards": []}
    d = _manifest(t / "ds", {"classes": list("0123456789"), "splits": {"train": split, "val": split}})
    return ["train", JOB, *TINY, f"data.path={d}", f"model.init_from={init_from}",
            f"run.storage_path={t / 'runs'}", f"tracking.uri=sqlite:///{t.parent / (t.name + '-mlflow.db')}"]


def _init_from_another_architecture(t: Path) -> list:
    import torch

    from vitlab.model import create_model

    other = create_model("vit_tiny_patch16_224", 10, {"img_size": 16, "patch_size": 4, "embed_dim": 32,
                                                      "depth": 2, "num_heads": 2, "mlp_ratio": 2.0})
    torch.save(other.state_dict(), t / "deeper.pt")
    return _finetune_job(t, str(t / "deeper.pt"))


# (name, setup(tmp_path) -> argv, the message) -- each is exit 2, one line, no traceback
BAD_INPUT = [
    ("non-UTF-8 job file", _non_utf8_job, "job.yaml: not UTF-8 text"),
    ("num_samples: lots", lambda t: ["sweep", JOB, _space(t, "num_samples: lots\nparams:\n  optim.lr: "
                                                          "{choice: [0.1]}\n")], "num_samples: expected an integer"),
    ("manifest without splits.train", _val_only_manifest, "splits.train is missing or malformed"),
    ("manifest shard outside the dataset", _escaping_shard, "shard file '../../etc/passwd'"),
    ("malformed CIFAR pickle", _malformed_cifar, "cifar/test: not a CIFAR-100 batch"),
    ("text file as MODEL", _text_as_model, "notes.txt"),
    ("wnids.txt entry ../../x", _wnids_escape, "wnids.txt: bad name '../../x'"),
    ("class folder with a newline", _class_folder_with_newline, "bad name 'b\\nc'"),
    ("run.name=../x", lambda t: ["train", JOB, "run.name=../x"], "run.name: Value error, bad name"),
    ("--overwrite of SOURCE", _overwrite_source, "--overwrite refused: it is or contains SOURCE"),
    ("--overwrite of SOURCE's parent", _overwrite_parent_of_source, "--overwrite refused: it is or contains SOURCE"),
    ("--overwrite of a folder vitlab did not write", _overwrite_user_folder, "not a dataset vitlab prepared"),
    ("model.init_from a hub name", lambda t: _finetune_job(t, "hf-hub:timm/vit_tiny_patch16_224"),
     "is a model-hub name; vitlab downloads nothing at run time"),
    ("model.init_from another architecture", _init_from_another_architecture,
     "unexpected key 'blocks.1.norm1.weight' in the weights"),
    ("data verify: a shard gone", lambda t: ["data", "verify", _manifest(t / "ds", {
        "classes": ["a"], "splits": {"train": {"rows": 1, "shards": [{"file": "train/0.parquet", "rows": 1,
                                                                       "sha256": "0" * 64}]},
                                     "val": {"rows": 0, "shards": []}}})], "train/0.parquet: unreadable"),
    ("override after an option, misspelt", lambda t: ["sweep", JOB, _space(t, "params:\n  optim.lr: {choice: "
                                                                             "[0.1]}\n"), "--num-samples", "2",
                                                       "optim.lrr=1"], "did you mean optim.lr"),
]


@pytest.mark.parametrize("setup, message", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, message):
    argv = setup(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert_one_line_error(run_cli(*argv), message)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing deleted


def test_overwrite_refusals_delete_nothing(tmp_path):
    _overwrite_user_folder(tmp_path)
    run_cli("data", "prepare", "digits", "--out", tmp_path / "thesis", "--overwrite")
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "months of work"
    argv = _overwrite_parent_of_source(tmp_path)
    run_cli(*argv)
    assert len(list((tmp_path / "home" / "src").rglob("*.JPEG"))) == 4


def test_options_and_overrides_mix_in_any_order(tmp_path):
    space = _space(tmp_path, "params:\n  optim.lr: {choice: [0.1]}\n")
    for argv in (["sweep", JOB, space, "optim.lrr=1", "--num-samples", "2"],
                 ["sweep", JOB, space, "--num-samples", "2", "optim.lrr=1"],
                 ["train", JOB, "--output-json", tmp_path / "o.json", "optim.lrr=1"]):
        assert_one_line_error(run_cli(*argv), "did you mean optim.lr")
    ran = run_cli("train", JOB, "--output-json", tmp_path / "o.json", "stray")
    assert ran.returncode == 2 and "unrecognized arguments: stray" in ran.stderr


def test_a_decompression_bomb_and_foreign_formats_are_rejects():
    with pytest.raises(Rejected, match="decompression bomb"):
        encode_image(png_bomb(), EncodeOptions())
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")  # PIL reads it, vitlab does not
    with pytest.raises(Rejected, match="not an image"):
        encode_image(ico.getvalue(), EncodeOptions())
    with pytest.raises(Rejected, match="truncated or corrupt"):
        encode_image(jpeg_bytes(1, 0)[:200], EncodeOptions())
    assert encode_image(jpeg_bytes(1, 0), EncodeOptions())[3] == "copied"


def test_outdir_swaps_whole_and_recovers(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = outdir.staging(final)
    (tmp / "new.txt").write_text("new")
    outdir.swap(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not list(tmp_path.glob(".out.*"))
    # a killed run's partial (its process is gone) is removed; a live process's is left alone
    dead = tmp_path / ".out.partial-999999999-deadbeef"
    live = tmp_path / f".out.partial-{os.getpid()}-cafecafe"
    dead.mkdir(), live.mkdir()
    # killed between moving the old output aside and moving the new one in: OUT is missing
    final.rename(tmp_path / ".out.old-999999999-0badf00d")
    outdir.recover(final)
    assert (final / "new.txt").read_text() == "new"
    assert not dead.exists() and live.exists() and not list(tmp_path.glob(".out.old-*"))
    (tmp_path / "notes").mkdir()
    outdir.recover(tmp_path / "notes")  # nothing of ours: nothing touched
    assert (tmp_path / "notes").is_dir() and live.exists()


def test_export_replaces_only_an_earlier_export(tmp_path):
    check_out(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "classes.json").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        check_out(tmp_path / "export", overwrite=False)
    check_out(tmp_path / "export", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not an export vitlab wrote"):
        check_out(tmp_path / "mine", overwrite=True)


@pytest.mark.parametrize("text, expected", [
    ("https://alice:s3cret@mlflow.example.com:5000", "https://***@mlflow.example.com:5000"),
    ("s3://bucket/x?access_key=AK&secret_key=SK&region=eu", "s3://bucket/x?access_key=***&secret_key=***&region=eu"),
    ("http://h/m?X-Amz-Signature=abc&X-Amz-Credential=k&v=1", "http://h/m?X-Amz-Signature=***&X-Amz-Credential=***&v=1"),
    ("gs://b/p?token=t0k", "gs://b/p?token=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("optim.lr=3e-4 run.name=x", "optim.lr=3e-4 run.name=x"),
])
def test_credentials_in_uris_are_redacted(text, expected):
    assert redact(text) == expected and redact(expected) == expected


def test_log_lines_and_errors_carry_no_credentials(tmp_path):
    record = logging.LogRecord("vitlab", logging.INFO, __file__, 1, "reading %s", ("s3://b/k?secret_key=SK",), None)
    RedactFilter().filter(record)
    assert record.getMessage() == "reading s3://b/k?secret_key=***"
    ran = run_cli("train", JOB, *TINY, "data.path=file:///nowhere?token=SECRET")
    assert ran.returncode == 2 and "SECRET" not in ran.stderr and "token=***" in ran.stderr


def test_mlflow_params_tags_and_manifests_hold_no_credentials(tmp_path):
    import mlflow

    from vitlab import tracking
    from vitlab.data.prepare import _manifest
    from vitlab.data.sources import Item, Listing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"data.path": "s3://bucket/shards?access_key=AK&secret_key=SK", "optim.lr": 0.001,
              "tracking.uri": "https://alice:s3cret@mlflow.example.com"}
    run_key = "s3://bucket/runs/x?token=T0K"
    run_id, _ = tracking.start_run(uri, "exp", run_key, "x", params, {"manifest.path": params["data.path"]})
    run = mlflow.MlflowClient(uri).get_run(run_id)
    recorded = json.dumps([run.data.params, run.data.tags])
    assert not any(secret in recorded for secret in ("AK", "SK", "s3cret", "T0K")), recorded
    assert run.data.params["optim.lr"] == "0.001" and "secret_key=***" in recorded
    assert tracking.find_run(mlflow.MlflowClient(uri), run.info.experiment_id, run_key) == run_id  # resumable

    listing = Listing("folders", ["a"], items=[Item("train", "a/1.jpg", 0)])
    manifest = _manifest("s3://bucket/raw?secret_key=SK", listing, [], EncodeOptions(), 32, 0, 1.0)
    assert manifest["source"] == "s3://bucket/raw?secret_key=***"


def test_rng_states_are_tensors_and_plain_values(tmp_path):
    """A checkpoint's RNG states load with torch's plain weights-only unpickler (no allowances) and restore."""
    import random

    import numpy as np
    import torch

    from vitlab.train.state import rng_state, set_rng_state

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    torch.save({"rng": [rng_state()]}, tmp_path / "state.pt")
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("text", ['{"epoch": 3}', '[[3, {"val_top1": "high"}]]', '[[3]]', "not json"])
def test_malformed_epoch_rows_cost_the_rows_not_the_restore(tmp_path, caplog, text):
    """A checkpoint's epoch_rows.json that is not [epoch, {metric: number}] pairs: a warning naming it, no rows."""
    from vitlab.train.state import EPOCH_ROWS_FILE, load_epoch_rows

    (tmp_path / EPOCH_ROWS_FILE).write_text(text)
    with caplog.at_level(logging.WARNING):
        assert load_epoch_rows(tmp_path) == []
    assert f"{tmp_path / EPOCH_ROWS_FILE}: not a list of [epoch, {{metric: number}}]" in caplog.text
    (tmp_path / EPOCH_ROWS_FILE).write_text('[[2, {"val_top1": 0.5}], [3, {"val_top1": 0.75, "lr": 1}]]')
    assert load_epoch_rows(tmp_path) == [(2, {"val_top1": 0.5}), (3, {"val_top1": 0.75, "lr": 1.0})]
    assert load_epoch_rows(tmp_path / "absent") == []
