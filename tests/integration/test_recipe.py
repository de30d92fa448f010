"""The rest of the training recipe on real Ray Train: repeated augmentation, model EMA and run.best_by, and a
resume that restores the EMA."""

import re
import time

import mlflow
import pytest
import torch

from tests.support import tiny_job as job
from vitlab.deploy.bundle import load_bundle
from vitlab.train import state
from vitlab.train.run import train

RECIPE = ["data.repeated_aug=2", "train.ema_decay=0.9",
          "run.best_by=val_top1_ema", "run.keep_checkpoints=3"]


def history(outcome, key):
    client = mlflow.MlflowClient(outcome.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(outcome.mlflow_run_id, key))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("recipe")


@pytest.fixture(scope="module")
def recipe(ray_session, digits_dir, store):
    return train(job(store, digits_dir, "recipe", "train.epochs=3", *RECIPE))


def test_repeated_aug_keeps_the_epoch_length_and_learns(recipe):
    # 1437 train rows over 2 workers of 32: 718 positions each, 22 full batches, as without repeats
    assert [v for _, v in history(recipe, "train_images")] == [22 * 32 * 2] * 3
    assert recipe.val_top1 > 0.18, recipe.val_top1  # chance is 0.1; 0.23 measured (the tiny model is slow to start)


def test_ema_is_logged_beside_the_live_weights_and_becomes_the_best_model(recipe, store):
    assert [s for s, _ in history(recipe, "val_top1_ema")] == [1, 2, 3]
    assert recipe.best_by == "val_top1_ema"
    best = dict(history(recipe, "val_top1_ema"))
    epoch = max(best, key=lambda e: (best[e], e))  # the checkpoint best_model.pt came from
    assert recipe.val_top1 == pytest.approx(best[epoch])
    checkpoint = next(p for p in (store / "runs" / "recipe").glob("checkpoint_2*")  # not the manager snapshot
                      if state.load_metrics(p)["epoch"] == epoch)
    saved = state.load_state(checkpoint)
    best_model = torch.load(recipe.model_path, map_location="cpu")
    exported = load_bundle(str(checkpoint)).model.state_dict()  # export/predict of the checkpoint: the same
    for key, value in best_model.items():
        assert torch.equal(value, saved["model_ema"][key]) and torch.equal(value, exported[key]), key
    assert not torch.equal(saved["model"]["blocks.0.attn.qkv.weight"], saved["model_ema"]["blocks.0.attn.qkv.weight"])


def test_resume_restores_the_ema(ray_session, digits_dir, store, recipe, capfd):
    again = train(job(store, digits_dir, "recipe", "train.epochs=4", *RECIPE))
    assert again.resumed and [s for s, _ in history(again, "val_top1_ema")] == [1, 2, 3, 4]
    time.sleep(2)  # Ray forwards worker log lines to the driver every second
    logs = "".join(capfd.readouterr())
    assert re.search(r"EMA weights restored \(epoch 3 done\)", logs), logs[-3000:]


def test_finetune_from_an_mlflow_model_at_another_image_size(ray_session, digits_dir, store, recipe, caplog):
    source = f"runs:/{recipe.mlflow_run_id}/model"
    with caplog.at_level("INFO", logger="vitlab.train.run"):
        tuned = train(job(store, digits_dir, "tuned", "train.epochs=1", "data.image_size=24",
                          f"model.init_from={source}"))
    assert "pos_embed resampled (4x4 -> 6x6 patches)" in caplog.text, caplog.text
    tags = mlflow.MlflowClient(tuned.tracking_uri).get_run(tuned.mlflow_run_id).data.tags
    assert tags["vitlab.init_from"] == source and re.fullmatch(r"[0-9a-f]{64}", tags["vitlab.init_from.sha256"])
    assert tags["vitlab.init_from.adapted"] == "pos_embed resampled (4x4 -> 6x6 patches)"
    # the trained weights were the start: epoch 1 is above what training from scratch reached in its epoch 1
    assert history(tuned, "val_top1")[0][1] > history(recipe, "val_top1")[0][1]
