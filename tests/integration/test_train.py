"""Distributed training on Ray Train (2 CPU workers, DDP over gloo) with a real MLflow sqlite store."""

import sqlite3
from pathlib import Path

import mlflow
import pytest
import timm
import torch

from tests.support import tiny_job as job
from tests.support.data import make_class_tree
from vitlab.train import state
from vitlab.train.run import TrainingError, train


def history(outcome, key):
    client = mlflow.MlflowClient(outcome.tracking_uri)
    return [m.step for m in sorted(client.get_metric_history(outcome.mlflow_run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def trained(ray_session, digits_dir, store):
    return train(job(store, digits_dir, "learns", "train.epochs=5"))


def test_two_workers_learn_and_report_outcome(trained):
    o = trained
    assert o.val_top1 > 0.4, f"val top-1 {o.val_top1} (chance is 0.1)"
    assert 0 <= o.val_top1 <= o.val_top5 <= 1 and o.epochs == 5
    assert Path(o.checkpoint, "state.pt").is_file() and Path(o.model_path).is_file()
    assert o.model == {"name": "vit_tiny_patch16_224",
                       "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
                                  "img_size": 16}}
    assert o.normalize == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]} and o.images_per_s > 0


def test_best_model_loads_into_plain_timm(trained):
    state = torch.load(trained.model_path, map_location="cpu")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    model = timm.create_model(trained.model["name"], num_classes=10, **trained.model["kwargs"])
    model.load_state_dict(state, strict=True)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_mlflow_run_holds_params_metrics_tags_artifacts(trained):
    client = mlflow.MlflowClient(trained.tracking_uri)
    run = client.get_run(trained.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["train.epochs"] == "5" and params["model.kwargs.depth"] == "1"
    for key in ("val_top1", "val_top5", "val_loss", "train_loss", "lr", "images_per_s", "epoch_time_s", "data_wait"):
        assert history(trained, key) == [1, 2, 3, 4, 5], key
    assert history(trained, "train_loss_step")  # every train.log_every_steps steps
    tags = run.data.tags
    for tag in ("vitlab.version", "manifest.sha256", "manifest.path", "git.commit", "git.dirty"):
        assert tag in tags, tag
    artifacts = {a.path for a in client.list_artifacts(trained.mlflow_run_id)}
    assert {"config.yaml", "curves.png", "confusion.png", "manifest.json"} <= artifacts
    model = mlflow.pytorch.load_model(f"runs:/{trained.mlflow_run_id}/model")
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_resume_continues_epoch_numbering(ray_session, digits_dir, store, trained):
    """Resumed to 7 epochs after epoch 5's MLflow rows are taken out of the store, as when the controller goes
    between registering epoch 5's checkpoint and logging it: the restore sends them from the checkpoint."""
    latest = sorted((store / "runs" / "learns").glob("checkpoint_2*"))[-1]
    [(epoch, row)] = state.load_epoch_rows(latest)  # the epochs it covers (it is kept 2 epochs more)
    assert epoch == 5 and row["val_top1"] == state.load_metrics(latest)["val_top1"]
    with sqlite3.connect(trained.tracking_uri.removeprefix("sqlite:///")) as db:
        assert db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 5", (trained.mlflow_run_id,)).rowcount
    assert history(trained, "val_top1") == [1, 2, 3, 4]
    again = train(job(store, digits_dir, "learns", "train.epochs=7"))
    assert again.resumed and again.mlflow_run_id == trained.mlflow_run_id and again.epochs == 7
    assert history(again, "val_top1") == [1, 2, 3, 4, 5, 6, 7]  # epochs 1-5 not trained (or logged) again
    fifth = [m.value for m in mlflow.MlflowClient(again.tracking_uri).get_metric_history(again.mlflow_run_id,
                                                                                         "val_top1") if m.step == 5]
    assert fifth == [row["val_top1"]]
    assert history(again, "epoch_time_s") == [1, 2, 3, 4, 5, 6, 7]


def test_resume_from_checkpoint_starts_there(ray_session, digits_dir, store, trained):
    latest = sorted((store / "runs" / "learns").glob("checkpoint_2*"))[-1]  # epoch 7, after the resume test
    o = train(job(store, digits_dir, "from_ckpt", "train.epochs=8"), resume_from=str(latest))
    assert not o.resumed and o.epochs == 8 and o.mlflow_run_id != trained.mlflow_run_id
    assert history(o, "val_top1") == [8]


def test_val_top1_exact_with_uneven_val_shards(ray_session, store, tmp_path):
    from vitlab.data.prepare import prepare

    src = make_class_tree(tmp_path / "src", ["a", "b", "c"], per_class=8, val_per_class=2, size=(16, 16))
    (src / "val" / "a" / "extra.JPEG").write_bytes((src / "val" / "a" / "a_8.JPEG").read_bytes())
    data = tmp_path / "shards"
    manifest = prepare(str(src), str(data), shard_rows=2)
    assert manifest["splits"]["val"]["rows"] == 7 and len(manifest["splits"]["val"]["shards"]) == 4
    o = train(job(store, str(data), "uneven", "train.epochs=1", "train.batch_size=8"))
    client = mlflow.MlflowClient(o.tracking_uri)
    seen = [m.value for m in client.get_metric_history(o.mlflow_run_id, "val_images")]
    assert seen == [7.0]
    top1 = client.get_metric_history(o.mlflow_run_id, "val_top1")[0].value
    assert round(top1 * 7) == pytest.approx(top1 * 7)  # a count out of 7, not an average of averages


def test_nan_loss_stops_with_step(ray_session, digits_dir, store):
    cfg = job(store, digits_dir, "nan", "train.epochs=2", "optim.lr=1e30", "optim.warmup_epochs=0")
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+"):
        train(cfg)
