"""Ray Tune sweeps, the Train V2 way: a Tuner over a trial function that builds and fits a TorchTrainer.

* A trial is the base JobConfig with a few dotted keys changed; its Train run is named from the trial id, so a
  restored sweep finds the trial's checkpoints. The whole sweep is checked once, on the driver (preflight of
  the base job, and every trial value against the schema and the model); trials do not check again.
* Each epoch's rank-0 metrics travel from the Train controller to the trial function through a small Ray
  queue; the trial reports them to Tune with a pointer checkpoint (a file naming the Train checkpoint), so
  ASHA/Hyperband can stop trials early and PBT can restart a trial from a donor's weights and optimizer.
* MLflow: one parent run per sweep, one child run per trial (tag mlflow.parentRunId), created by the trial
  itself wherever it runs, with the tracking URI passed explicitly (not taken from the node's environment).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.util.queue import Queue

from vitlab import logs, plots, tracking
from vitlab.cluster import connect
from vitlab.config import JobConfig
from vitlab.errors import UserError
from vitlab.redact import redact
from vitlab.train import storage
from vitlab.train.callbacks import ForwardToQueue
from vitlab.train.preflight import Checked, check_job, preflight
from vitlab.train.run import train
from vitlab.tune import pbt, space
from vitlab.tune import pointer as checkpoint_pointer
from vitlab.tune.callbacks import ParentRunCallback, SweepStatusCallback, ended_as, trial_key
from vitlab.tune.space import SweepSpec

log = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0  # the driver's status table
BEST_FILE = "best.yaml"


class SweepInterrupted(UserError):
    """The driver was interrupted (Ctrl-C); Tune saved the sweep's state for --resume."""

    exit_code = 130


# ---------------------------------------------------------------------------------------------------------
# Trial side


def next_generation(sweep_dir: str, trial_id: str) -> int:
    """A PBT exploit's Train run: one past the trial's latest generation in storage. The donor's generation
    cannot name it: a trial that exploits a lower-generation donor a second time would land in its own earlier
    run's directory and continue that run's weights instead of the donor's."""
    taken = re.compile(rf"{re.escape(trial_id)}_g(\d+)")
    found = [int(m.group(1)) for name in storage.list_names(f"{sweep_dir}/trials") if (m := taken.fullmatch(name))]
    return max(found, default=0) + 1


def run_trial(config: dict[str, Any], base: JobConfig, sweep_dir: str, parent_run_id: str,
              checked: Checked) -> None:
    """Tune's trainable: build the trial's JobConfig, fit it, forward each epoch's metrics to Tune."""
    logs.mark_worker_logging()
    trial_id = tune.get_context().get_trial_id()
    pointer = checkpoint_pointer.read(tune.get_checkpoint())
    own_prefix = trial_key(sweep_dir, trial_id)
    generation = (pointer or {}).get("generation", 0)
    resume_from = None
    if pointer:
        resume_from = pointer["path"]
        if not resume_from.startswith(own_prefix + "/") and not resume_from.startswith(own_prefix + "_g"):
            # a PBT exploit: continue from the donor's checkpoint (its copy, made by the scheduler) under a fresh
            # Train run
            generation = next_generation(sweep_dir, trial_id)
    name = trial_id if generation == 0 else f"{trial_id}_g{generation}"
    cfg = base.with_overrides({**config, "run.name": name, "run.storage_path": f"{sweep_dir}/trials"},
                              source="trial")
    if pointer and pointer.get("epoch", 0) >= cfg.train.epochs:
        # PBT exploits at its last perturbation too: the donor's checkpoint is already the final epoch, so
        # this trial is done (a Train run with no epoch left would end without a checkpoint of its own).
        return

    epochs: Queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = train(cfg, resume_from=resume_from, parent_run_id=parent_run_id,
                                      callbacks=[ForwardToQueue(epochs)], tracking_key=own_prefix,
                                      log_model=False, checked=checked)
        except BaseException as e:  # re-raised in the trial's main thread
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    worker.start()
    reported = (pointer or {}).get("epoch", 0)
    while True:
        try:
            metrics, path = epochs.get(timeout=1.0)
        except queue.Empty:  # ray.util.queue.Empty is one
            if not worker.is_alive() and epochs.empty():
                break
            continue
        # the pointer names the checkpoint as a URI on remote storage (Ray's path has no scheme): what a PBT
        # exploit or a resumed sweep hands to --resume-from
        checkpoint_pointer.report(metrics, storage.checkpoint_location(cfg, path) if path else None, generation)
        reported = max(reported, int(metrics.get("epoch", 0)))
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    last = outcome["result"]
    if last.epochs > reported and not last.last_metrics.get("mid_epoch"):
        # The Train run registered these epochs before a killed driver let Tune record them; resumed, the fit
        # restored them with nothing left to train, so Tune hears of the last one here (else it ends the trial
        # as stopped early, at the epoch it last heard of).
        checkpoint_pointer.report(last.last_metrics, last.last_checkpoint, generation)


# ---------------------------------------------------------------------------------------------------------
# Driver side


def trial_resources(cfg: JobConfig) -> dict[str, float]:
    """What one trial holds: its Train workers, plus room for one decode task. The trial function itself
    only waits, so it reserves no CPU."""
    res = {"CPU": cfg.scaling.max_workers * cfg.scaling.cpus_per_worker + cfg.data.decode_cpus}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.scaling.max_workers * cfg.scaling.gpus_per_worker
    return res


def auto_concurrency(cfg: JobConfig) -> int:
    """Cluster resources / resources of one trial (at least 1)."""
    total = ray.cluster_resources()
    fits = [math.floor(total.get(k, 0) / v + 1e-9) for k, v in trial_resources(cfg).items() if v > 0]
    return max(1, min(fits) if fits else 1)


def base_point(spec: SweepSpec, base: JobConfig) -> list[dict[str, Any]] | None:
    """With ``search.include_base``, the base job's own values of the searched keys, tried first (Tune's
    points_to_evaluate; it counts toward num_samples): with a deterministic job that trial reproduces the
    job run alone, the baseline the sweep set out to beat."""
    if not spec.search.get("include_base"):
        return None
    flat = base.flat()
    return [{k: flat[k] for k in spec.params if k in flat}]


def check_trial_values(base: JobConfig, spec: SweepSpec, checked: Checked) -> None:
    """Every distribution's bounds or choices must give a valid job (types, ranges, a model timm builds, a
    batch the data fits), before Ray starts: the trials do not check again."""
    for key, dist in spec.params.items():
        for value in space.samples(dist):
            cfg = base.with_overrides({key: value}, source=f"{spec.source}: params.{key}")
            check_job(cfg, checked.manifest)


def sweep_name(cfg: JobConfig, space_path: str) -> str:
    return f"{cfg.run.name or 'vitlab'}-{Path(space_path).stem}"


def run_sweep(base: JobConfig, spec: SweepSpec, space_path: str, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the sweep; returns what --output-json writes."""
    checked = preflight(base)
    check_trial_values(base, spec, checked)
    root = storage.storage_root(base)
    # Trials run in their own working directories (and maybe on other nodes): pin paths and the tracking URI.
    base = base.with_overrides({"data.path": checked.manifest.root, "tracking.uri": checked.tracking_uri,
                                "run.storage_path": root})
    name = sweep_name(base, space_path)
    sweep_dir = storage.join(root, name)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise UserError(f"--resume: no sweep to resume at {sweep_dir}")
    if not resume and tune.Tuner.can_restore(sweep_dir):
        raise UserError(f"{sweep_dir}: a sweep of that name exists; pass --resume to continue it, or set run.name")
    logs.keep_log_in(sweep_dir)
    connect()
    uri = checked.tracking_uri
    parent_params = {"space": json.dumps(spec.params), "scheduler": json.dumps(spec.scheduler),
                     "search": json.dumps(spec.search), "metric": spec.metric, "mode": spec.mode,
                     "num_samples": spec.num_samples, "job": json.dumps(base.to_dict())}
    parent_id, _ = tracking.start_run(uri, base.tracking.experiment, sweep_dir, name, parent_params,
                                      {**tracking.run_tags(base, checked.manifest), "vitlab.kind": "sweep"},
                                      resume=resume, inputs=checked.manifest)
    concurrency = auto_concurrency(base) if spec.max_concurrent_trials == "auto" else spec.max_concurrent_trials
    log.info("sweep %s: %d trials, %d at a time, scheduler %s, search %s", name, expected_trials(spec), concurrency,
             spec.scheduler["name"], spec.search["name"])
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep_dir=sweep_dir, parent_run_id=parent_id, checked=checked),
        # The trial function only waits on its TorchTrainer: no CPU, just a token of memory (Tune needs a
        # non-empty request).
        {"CPU": 0, "memory": 64 * 1024**2},
    )
    # Tune's own console output off: its new output engine prints a banner and paths even at verbose=0, the
    # legacy one prints nothing at verbose=0. SweepStatusCallback says what vitlab users need.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    callbacks = [ParentRunCallback(uri, parent_id, spec.metric, spec.mode, base.train.epochs, sweep_dir),
                 SweepStatusCallback(name, spec.metric, spec.mode, base.train.epochs, list(spec.params),
                                     expected_trials(spec), STATUS_EVERY_S)]
    start = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                max_concurrent_trials=concurrency, scheduler=space.scheduler(spec, base.train.epochs),
                search_alg=space.search_alg(spec, base_point(spec, base), base.train.seed, concurrency),
            ),
            run_config=tune.RunConfig(name=name, storage_path=root, callbacks=callbacks, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    try:
        grid = tuner.fit()
        finished = grid.num_terminated + grid.num_errors
        if finished < expected_trials(spec):
            # Tune returns normally after Ctrl-C (it saved its state): this is not the sweep's end.
            raise SweepInterrupted(f"sweep {name} interrupted with {finished} of {expected_trials(spec)} trials "
                                   f"finished; continue it with the same command and --resume")
        return _finish(base, spec, grid, uri, parent_id, sweep_dir, time.perf_counter() - start)
    except BaseException as e:  # the parent run never stays RUNNING (--resume reopens it)
        killed = isinstance(e, (SweepInterrupted, KeyboardInterrupt))
        tracking.end_run_quietly(uri, parent_id, "KILLED" if killed else "FAILED")
        raise


def expected_trials(spec: SweepSpec) -> int:
    """num_samples, times every grid's size (Tune repeats the whole grid num_samples times)."""
    n = spec.num_samples
    for dist in spec.params.values():
        if "grid" in dist:
            n *= len(dist["grid"])
    return n


@dataclass
class TrialRow:
    id: str
    params: dict[str, Any]
    val_top1: float | None
    epochs_run: int
    status: str


def _rows(grid, spec: SweepSpec, epochs: int) -> list[TrialRow]:
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        # the trial's own reports name it; its last metrics may be a PBT donor's (an exploit at the last
        # perturbation copies the donor's result, and the trial ends without a report of its own)
        ids = list(df["trial_id"].dropna()) if df is not None and "trial_id" in df else []
        trial_id = str(ids[-1]) if ids else metrics.get("trial_id") or storage.basename(result.path)
        done = int(metrics.get("epoch", 0))
        if result.error is not None:
            status = "errored"
        else:
            status = ended_as(done, epochs)
        values = list(df[spec.metric].dropna()) if df is not None and spec.metric in df else []
        if not values and spec.metric in metrics:
            values = [metrics[spec.metric]]  # a PBT-restarted trial's dataframe can come back empty
        best = (max(values) if spec.mode == "max" else min(values)) if len(values) else None
        # the last epoch reached: Tune's dataframe starts over when PBT restores a trial from a donor
        epochs_run = done or (int(len(df)) if df is not None else 0)
        rows.append(TrialRow(trial_id, dict(result.config or {}), None if best is None else float(best),
                             epochs_run, status))
    reverse = spec.mode == "max"
    rows.sort(key=lambda r: (r.val_top1 is None, -(r.val_top1 or 0) if reverse else (r.val_top1 or 0)))
    return rows


def _trial_curves(grid, metric: str) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and metric in df and "epoch" in df:
            curves[storage.basename(result.path)[-12:]] = list(zip(df["epoch"], df[metric], strict=True))
    return curves


def _finish(base: JobConfig, spec: SweepSpec, grid, uri: str, parent_id: str, sweep_dir: str,
            seconds: float) -> dict[str, Any]:
    rows = _rows(grid, spec, base.train.epochs)
    if not grid.num_errors:
        pbt.remove_donor_copies(sweep_dir)
    best_row = next((r for r in rows if r.val_top1 is not None), None)
    best_path = storage.join(sweep_dir, BEST_FILE)
    with tempfile.TemporaryDirectory(prefix="vitlab-artifacts-") as tmp:
        art = Path(tmp)
        files = [_trials_csv(rows, art / "trials.csv"),
                 plots.trial_curves(_trial_curves(grid, spec.metric), spec.metric, art / "trials_curves.png")]
        if best_row is not None:
            best_cfg = base.with_overrides({**best_row.params, "run.name": f"{storage.basename(sweep_dir)}-best"})
            text = redact(f"# the best trial's full JobConfig: vitlab train {best_path}\n{best_cfg.to_yaml()}")
            storage.write_text(best_path, text)
            (art / BEST_FILE).write_text(text)
            keys = [k for k in spec.params if all(isinstance(r.params.get(k), (int, float)) for r in rows)]
            scored = [(r.params, r.val_top1) for r in rows if r.val_top1 is not None]
            log_keys = {k for k in keys if "loguniform" in spec.params[k]}
            files += [art / BEST_FILE, plots.parallel_coordinates(scored, keys, log_keys, spec.metric,
                                                                  art / "parallel_coordinates.png")]
        tracking.log_artifacts(uri, parent_id, files)
    tracking.end_run(uri, parent_id, "FINISHED")
    return {
        "mlflow_parent_run_id": parent_id,
        "tracking_uri": uri,
        "sweep_dir": sweep_dir,
        "best_config": best_path if best_row else None,
        "best_val_top1": best_row.val_top1 if best_row else None,
        "trials": [r.__dict__ for r in rows],
        "trial_epochs_total": sum(r.epochs_run for r in rows),
        "trial_epochs_fifo": expected_trials(spec) * base.train.epochs,
        "wall_s": round(seconds, 1),
    }


def _trials_csv(rows: list[TrialRow], out: Path) -> Path:
    keys = sorted({k for r in rows for k in r.params})
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *keys, "val_top1", "epochs_run", "status"])
        for r in rows:
            w.writerow([r.id, *(r.params.get(k) for k in keys), r.val_top1, r.epochs_run, r.status])
    return out


def format_table(report: dict[str, Any]) -> str:
    trials = report["trials"]
    keys = sorted({k for t in trials for k in t["params"]})
    head = ["rank", "trial", *keys, "val_top1", "epochs", "status"]
    lines = [head]
    for i, t in enumerate(trials, 1):
        vals = [_fmt(t["params"].get(k)) for k in keys]
        top1 = "-" if t["val_top1"] is None else f"{t['val_top1']:.4f}"
        lines.append([str(i), t["id"], *vals, top1, str(t["epochs_run"]), t["status"]])
    widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in lines)
    frac = report["trial_epochs_total"] / max(1, report["trial_epochs_fifo"])
    return (f"{text}\n\ntrained {report['trial_epochs_total']} trial-epochs of {report['trial_epochs_fifo']} "
            f"that FIFO would ({frac:.0%}); best val top-1 {report['best_val_top1']}\n"
            f"best config: {report['best_config']}  (vitlab train {report['best_config']})\n"
            f"MLflow parent run {report['mlflow_parent_run_id']} in {report['tracking_uri']}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
