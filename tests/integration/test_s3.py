"""The cluster's paths on object storage: a real S3 server on 127.0.0.1 (moto), s3:// everywhere, and a training
as a cluster runs one: shards and checkpoints in S3, tracked through the authenticated MLflow server (its
artifacts proxied to S3), then registered and exported through it. A sweep's trials and best.yaml in S3:
test_sweep.py (the ASHA sweep and the resumed one)."""

import io
import json

import mlflow
import pytest
import torch

from tests.support import tiny_job as job
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.data import make_class_tree
from vitlab.data.manifest import load_manifest
from vitlab.data.prepare import prepare
from vitlab.deploy.bundle import load_bundle
from vitlab.train import storage
from vitlab.train.run import train

DATA = "s3://vitlab/shards/digits"
RUNS = "s3://vitlab/runs"


@pytest.fixture(scope="module")
def shards(ray_session, s3):
    prepare("digits", DATA)
    return DATA


def shard_keys(s3) -> list[str]:
    return [k for k in s3.keys("shards/digits/") if k.endswith(".parquet")]


def test_prepare_publishes_a_version_and_the_manifest_last(s3, shards):
    manifest = load_manifest(shards)
    listed = [s["file"] for split in manifest.data["splits"].values() for s in split["shards"]]
    version = listed[0].split("/")[0]
    assert version.startswith("v-") and all(f.startswith(version + "/") for f in listed)
    assert shard_keys(s3) == sorted(f"shards/digits/{f}" for f in listed)
    assert manifest.rows("train") == 1437 and manifest.rows("val") == 360


def test_overwrite_replaces_the_version_and_removes_only_the_old_shards(s3, shards):
    s3_before = shard_keys(s3)
    storage.write_text(f"{shards}/README.txt", "someone's notes")  # not vitlab's: stays
    prepare("digits", shards, overwrite=True)
    after = shard_keys(s3)
    listed = json.loads(storage.read_bytes(f"{shards}/manifest.json"))["splits"]
    files = sorted(f"shards/digits/{s['file']}" for split in listed.values() for s in split["shards"])
    assert after == files and not set(after) & set(s3_before)
    assert "shards/digits/README.txt" in s3.keys("shards/digits/")


def test_prepare_reads_raw_class_folders_from_s3(s3, ray_session, tmp_path):
    tree = make_class_tree(tmp_path / "raw", ["cat", "dog", "eel"], per_class=6, val_per_class=2)
    for f in sorted(p for p in tree.rglob("*.JPEG")):
        storage.write_bytes(f"s3://vitlab/raw/{f.relative_to(tree).as_posix()}", f.read_bytes())
    manifest = prepare("s3://vitlab/raw", "s3://vitlab/shards/raw")
    assert manifest["classes"] == ["cat", "dog", "eel"] and not manifest["rejects"]
    assert manifest["splits"]["train"]["rows"] == 18 and manifest["splits"]["val"]["rows"] == 6
    assert run_cli("data", "verify", "s3://vitlab/shards/raw").returncode == 0


def test_verify_checks_every_shard_and_names_a_changed_one(s3, shards, tmp_path):
    ran = run_cli("data", "verify", shards)
    assert ran.returncode == 0 and "17 shards, 1797 rows" in ran.stdout, ran.stderr
    # a copy of the dataset with one shard replaced by another's bytes
    copy = "s3://vitlab/shards/tampered"
    manifest = json.loads(storage.read_bytes(f"{shards}/manifest.json"))
    files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    for f in files:
        source = files[0] if f == files[1] else f  # shard 1 gets shard 0's bytes
        storage.write_bytes(f"{copy}/{f}", storage.read_bytes(f"{shards}/{source}"))
    storage.write_bytes(f"{copy}/manifest.json", json.dumps(manifest).encode())
    assert_one_line_error(run_cli("data", "verify", copy), f"{copy}/{files[1]}: sha256")


@pytest.fixture(scope="module")
def trained(shards, tracking_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("s3train")
    return store, train(job(store, shards, "s3run", "train.epochs=2", f"run.storage_path={RUNS}",
                            f"tracking.uri={tracking_server.uri}"))


def test_train_logs_through_the_server_and_artifacts_land_in_the_bucket(trained, tracking_server, s3):
    _, o = trained
    client = mlflow.MlflowClient(tracking_server.uri)
    run = client.get_run(o.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
    # before the resume test below takes the run on to epoch 3
    assert [m.step for m in client.get_metric_history(o.mlflow_run_id, "val_top1")] == [1, 2]
    keys = s3.keys(f"mlflow-artifacts/{run.info.experiment_id}/")
    names = {k.rsplit("/", 1)[1] for k in keys if f"/{o.mlflow_run_id}/" in k}
    assert {"config.yaml", "manifest.json", "curves.png"} <= names, names
    model = mlflow.pytorch.load_model(f"runs:/{o.mlflow_run_id}/model")  # MLflow 3: a logged model
    assert any(k.endswith("/MLmodel") for k in keys) and model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    assert tracking_server.admin_password not in str(run.data.params) + str(run.data.tags)


def test_register_and_export_through_the_server(trained, tracking_server, tmp_path):
    _, o = trained
    ran = run_cli("register", o.mlflow_run_id, "--name", "digits-auth", "--alias", "champion",
                  "--tracking-uri", tracking_server.uri)
    assert ran.returncode == 0, ran.stderr
    bundle = load_bundle("models:/digits-auth@champion", tracking_server.uri)
    assert bundle.run_id == o.mlflow_run_id and bundle.model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    ran = run_cli("export", "models:/digits-auth@champion", "--out", tmp_path / "onnx",
                  "--tracking-uri", tracking_server.uri)
    assert ran.returncode == 0 and (tmp_path / "onnx" / "model.onnx").is_file(), ran.stderr


def test_train_reads_and_checkpoints_in_s3_and_resumes(s3, shards, trained, tracking_server):
    store, o = trained
    assert o.model_path == f"{RUNS}/s3run/best_model.pt" and o.checkpoint.startswith(f"{RUNS}/s3run/checkpoint_")
    assert o.val_top1 > 0.15
    assert any(k.startswith("runs/s3run/checkpoint_") and k.endswith("/state.pt") for k in s3.keys("runs/s3run/"))
    again = train(job(store, shards, "s3run", "train.epochs=3", f"run.storage_path={RUNS}",
                      f"tracking.uri={tracking_server.uri}"))
    assert again.resumed and again.epochs == 3 and again.mlflow_run_id == o.mlflow_run_id


def test_export_predict_take_every_path_train_prints(s3, trained, tmp_path):
    _, o = trained
    best = torch.load(io.BytesIO(storage.read_bytes(o.model_path)), map_location="cpu")
    for spec in (o.model_path, o.run_dir, o.checkpoint):
        bundle = load_bundle(spec)
        assert bundle.num_classes == 10 and bundle.image_size == 16 and bundle.source == spec, spec
        assert bundle.model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    loaded = load_bundle(o.model_path).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in best.items())
    ran = run_cli("export", o.model_path, "--out", tmp_path / "export")
    assert ran.returncode == 0 and (tmp_path / "export" / "model.onnx").is_file(), ran.stderr
    assert_one_line_error(run_cli("export", f"{RUNS}/nope/best_model.pt", "--out", tmp_path / "x"),
                          "s3://vitlab/runs/nope/best_model.pt: no such object")


def test_finetune_from_s3(s3, shards, trained):
    store, o = trained
    tuned = train(job(store, shards, "s3tuned", "train.epochs=1", "data.image_size=24",
                      f"model.init_from={o.model_path}", f"run.storage_path={RUNS}"))
    assert tuned.epochs == 1 and tuned.model_path == f"{RUNS}/s3tuned/best_model.pt"
