"""Synchronous PBT when a trial comes back later than Tune last heard of it.

A vitlab trial continues its Train run from that run's own latest checkpoint, so a trial that Tune paused after
epoch E while its Train run went on comes back reporting epoch E + 2 or later. Ray's synchronous PBT can then
leave every trial paused at or past its next sync time, with none it would start again: the sweep waits forever.
Here a small real Tune run (2 trials on the session's Ray, vitlab's PBT scheduler) makes that jump on purpose:
a trial restored at epoch 1 reports epoch 3 next."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

EPOCHS = 4


def jumping_trial(config: dict) -> None:
    from ray import tune

    epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            epoch = int((Path(d) / "epoch").read_text())
    # restored at epoch 1, it comes back at epoch 3: its run trained epoch 2 after Tune paused it
    for e in range(3 if epoch == 1 else epoch + 1, EPOCHS + 1):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch").write_text(str(e))
            tune.report({"epoch": e, "score": config["lr"] * e}, checkpoint=tune.Checkpoint.from_directory(d))


@pytest.mark.timeout(300)
def test_synch_pbt_finishes_when_a_trial_comes_back_epochs_later(ray_session, tmp_path):
    from ray import tune

    from vitlab.tune import space

    options = {**space.SCHEDULERS["pbt"].options, "perturbation_interval": 1, "quantile_fraction": 0.5,
               "resample_probability": 0.0, "synch": True, "hyperparam_mutations": {"lr": {"choice": [1.0, 2.0]}}}
    tuner = tune.Tuner(
        tune.with_resources(jumping_trial, {"CPU": 0.5}),
        param_space={"lr": tune.grid_search([1.0, 2.0])},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=2, time_budget_s=90,
                                    scheduler=space.SCHEDULERS["pbt"].build(options, EPOCHS)),
        run_config=tune.RunConfig(name="jump", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    ended = sorted((r.metrics.get("epoch"), r.metrics.get("done")) for r in results)
    assert ended == [(EPOCHS, True), (EPOCHS, True)], ended  # both trials trained to the end, none left paused
