"""vitlab's PBT scheduler where Ray's own fails vitlab's trials, each shown by a small real Tune run (2 trials on the
session's Ray) of a toy trial that behaves like vitlab's on the point in question.

* Synchronous PBT when a trial comes back later than Tune last heard of it. A vitlab trial continues its Train run
  from that run's own latest checkpoint, so a trial that Tune paused after epoch E while its Train run went on
  comes back reporting epoch E + 2 or later. Ray's synchronous PBT can then leave every trial paused at or past
  its next sync time, with none it would start again: the sweep waits forever. The toy trial restored at epoch 1
  reports epoch 3 next.
* A donor's checkpoint deleted by the donor's own retention before the exploit uses it. A vitlab trial reports a
  pointer to a Train checkpoint, and its Train run keeps only its latest few: the toy trial does the same (keeps
  only its latest), and takes a second, as a Train run's start does, before it opens the donor's checkpoint."""

from __future__ import annotations

import json
import tempfile
import time
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


def _pbt(**options):
    from vitlab.tune import space

    return space.SCHEDULERS["pbt"].build({**space.SCHEDULERS["pbt"].options, "quantile_fraction": 0.5,
                                          "resample_probability": 0.0, **options}, EPOCHS)


@pytest.mark.timeout(300)
def test_synch_pbt_finishes_when_a_trial_comes_back_epochs_later(ray_session, tmp_path):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(jumping_trial, {"CPU": 0.5}),
        param_space={"lr": tune.grid_search([1.0, 2.0])},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=2, time_budget_s=90,
                                    scheduler=_pbt(perturbation_interval=1, synch=True,
                                                   hyperparam_mutations={"lr": {"choice": [1.0, 2.0]}})),
        run_config=tune.RunConfig(name="jump", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    ended = sorted((r.metrics.get("epoch"), r.metrics.get("done")) for r in results)
    assert ended == [(EPOCHS, True), (EPOCHS, True)], ended  # both trials trained to the end, none left paused


RETENTION_EPOCHS = 12


def retaining_trial(config: dict) -> None:
    """Reports each epoch with a vitlab pointer to its own "Train checkpoint" (a directory holding state.pt with
    the epoch in it), and deletes the one before, as a Train run's retention does. Restored from another trial's
    checkpoint (an exploit), it waits a second, then notes whether that checkpoint is there and whole."""
    from ray import tune

    from vitlab.tune import pointer

    trial_id = tune.get_context().get_trial_id()
    runs = Path(config["sweep"]) / "trials" / trial_id
    epoch = 0
    start = pointer.read(tune.get_checkpoint())
    if start:
        epoch = start["epoch"]
        if not start["path"].startswith(str(runs)):
            time.sleep(1.0)  # a Train run's start: the controller and workers come up before they restore
            state = Path(start["path"]) / "state.pt"
            found = {"path": start["path"], "epoch": epoch,
                     "state_epoch": int(state.read_text()) if state.is_file() else None}
            restores = Path(config["sweep"]) / "restores"
            restores.mkdir(exist_ok=True)
            (restores / f"{trial_id}-{time.time_ns()}.json").write_text(json.dumps(found))
    previous = None
    for e in range(epoch + 1, RETENTION_EPOCHS + 1):
        time.sleep(0.1)
        checkpoint = runs / f"checkpoint_{time.time_ns()}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.pt").write_text(str(e))
        pointer.report({"epoch": e, "score": config["lr"] * e}, str(checkpoint), 0)
        if previous is not None:
            for f in previous.iterdir():
                f.unlink()
            previous.rmdir()
        previous = checkpoint


@pytest.mark.timeout(300)
def test_pbt_exploit_finds_the_donor_checkpoint_after_the_donor_moved_on(ray_session, tmp_path):
    from ray import tune

    from vitlab.tune.pbt import DONORS_DIR

    sweep = tmp_path / "sweep"
    tuner = tune.Tuner(
        tune.with_resources(retaining_trial, {"CPU": 0.5}),
        param_space={"lr": tune.grid_search([1.0, 2.0]), "sweep": str(sweep)},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=2, time_budget_s=120,
                                    scheduler=_pbt(perturbation_interval=3, synch=False,
                                                   hyperparam_mutations={"lr": {"choice": [1.0, 2.0]}})),
        run_config=tune.RunConfig(name="retain", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    assert sorted(r.metrics["epoch"] for r in results) == [RETENTION_EPOCHS, RETENTION_EPOCHS]
    restores = [json.loads(f.read_text()) for f in (sweep / "restores").iterdir()]
    assert restores, "no exploit happened"
    # every exploit opened a whole copy of the donor's checkpoint at the epoch PBT chose, though the donor's own
    # directory had been deleted by then
    assert all(r["state_epoch"] == r["epoch"] for r in restores), restores
    assert all(f"/trials/{DONORS_DIR}/" in r["path"] for r in restores), restores
    # a donor's copies go once no trial starts from them: at most the latest and one not yet restarted from
    copies = sorted(p.name for p in (sweep / "trials" / DONORS_DIR).iterdir())
    by_donor = {name.rsplit("_e", 1)[0] for name in copies}
    assert all(sum(n.startswith(f"{d}_e") for n in copies) <= 2 for d in by_donor), copies
