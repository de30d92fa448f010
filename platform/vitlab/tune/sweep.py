"""Ray Tune sweeps, the Train V2 way: a Tuner over a trial function that builds and fits a TorchTrainer.

* A trial is a JobConfig with a few dotted keys changed; its Train run is named from the trial id, so a
  restored sweep finds the trial's checkpoints.
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab.config import JobConfig
from vitlab.errors import ConfigError, UserError
from vitlab.tune.space import SweepSpec

log = logging.getLogger(__name__)

POINTER_FILE = "train_checkpoint.json"
BEST_FILE = "best.yaml"


class SweepInterrupted(UserError):
    """The driver was interrupted (Ctrl-C); Tune saved the sweep's state for --resume."""

    exit_code = 130


# ---------------------------------------------------------------------------------------------------------
# Trial side


def _forwarding_callback(q):
    """A Train callback (runs in the Train controller) putting (metrics, checkpoint path) on ``q``."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardToTrial(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            q.put((dict(metrics[0]), checkpoint.path if checkpoint else None))

    return ForwardToTrial()


def _pointer_checkpoint(train_ckpt: str, generation: int, epoch: int):
    """A Tune checkpoint that only names the Train checkpoint (no model bytes copied again) and its epoch."""
    import tempfile

    from ray import tune

    d = Path(tempfile.mkdtemp(prefix="vitlab-pointer-"))
    (d / POINTER_FILE).write_text(json.dumps({"path": train_ckpt, "generation": generation, "epoch": epoch}))
    return tune.Checkpoint.from_directory(str(d))


def _read_pointer(ckpt) -> dict[str, Any] | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        f = Path(d) / POINTER_FILE
        return json.loads(f.read_text()) if f.is_file() else None


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> JobConfig:
    return JobConfig.model_validate(base).with_overrides(overrides, source="trial")


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str, parent_run_id: str) -> None:
    """Tune's trainable: build the trial's JobConfig, fit it, forward each epoch's metrics to Tune."""
    from ray import tune
    from ray.util.queue import Queue

    from vitlab.train.trainer import train

    trial_id = tune.get_context().get_trial_id()
    pointer = _read_pointer(tune.get_checkpoint())
    own_prefix = f"{sweep_dir}/trials/{trial_id}"
    generation = (pointer or {}).get("generation", 0)
    resume_from = None
    if pointer:
        resume_from = pointer["path"]
        if not resume_from.startswith(own_prefix + "/") and not resume_from.startswith(own_prefix + "_g"):
            generation += 1  # a PBT exploit: continue from the donor's checkpoint under a fresh Train run
    name = trial_id if generation == 0 else f"{trial_id}_g{generation}"
    cfg = trial_config(base, {**config, "run.name": name, "run.storage_path": f"{sweep_dir}/trials"})
    if pointer and pointer.get("epoch", 0) >= cfg.train.epochs:
        # PBT exploits at its last perturbation too: the donor's checkpoint is already the final epoch, so
        # this trial is done (a Train run with no epoch left would end without a checkpoint of its own).
        return

    q: Queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = train(cfg, resume_from=resume_from, parent_run_id=parent_run_id,
                                      callbacks=[_forwarding_callback(q)], tracking_key=own_prefix,
                                      log_model=False)
        except BaseException as e:  # re-raised in the trial's main thread
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    worker.start()
    while True:
        try:
            metrics, path = q.get(timeout=1.0)
        except queue.Empty:
            if not worker.is_alive() and q.empty():
                break
            continue
        except Exception:  # ray.util.queue raises its own Empty
            if not worker.is_alive() and q.empty():
                break
            continue
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        checkpoint = _pointer_checkpoint(path, generation, int(metrics.get("epoch", 0))) if path else None
        tune.report(metrics, checkpoint=checkpoint)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]


# ---------------------------------------------------------------------------------------------------------
# Driver side


def trial_resources(cfg: JobConfig) -> dict[str, float]:
    """What one trial holds: its Train workers, plus room for one decode task. The trial function itself
    only waits, so it reserves no CPU."""
    cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.decode_cpus
    res = {"CPU": cpus}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    return res


def auto_concurrency(cfg: JobConfig) -> int:
    """Cluster resources / resources of one trial (at least 1)."""
    import ray

    total = ray.cluster_resources()
    need = trial_resources(cfg)
    fits = [math.floor(total.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def _scheduler(spec: SweepSpec, max_t: int):
    from ray.tune.schedulers import (
        AsyncHyperBandScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        PopulationBasedTraining,
    )

    from vitlab.tune.space import tune_domain

    opts = {k: v for k, v in spec.scheduler.items() if k != "name"}
    name = spec.scheduler["name"]
    if name == "fifo":
        return FIFOScheduler()
    if name == "asha":
        return AsyncHyperBandScheduler(time_attr="epoch", max_t=max_t, grace_period=opts.get("grace_period", 1),
                                       reduction_factor=opts.get("reduction_factor", 3),
                                       brackets=opts.get("brackets", 1))
    if name == "hyperband":
        return HyperBandScheduler(time_attr="epoch", max_t=max_t, reduction_factor=opts.get("reduction_factor", 3))
    mutations = {k: tune_domain(d) for k, d in opts.get("hyperparam_mutations", {}).items()}
    return PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=opts.get("perturbation_interval", 2),
        hyperparam_mutations=mutations, quantile_fraction=opts.get("quantile_fraction", 0.25),
        resample_probability=opts.get("resample_probability", 0.25), synch=opts.get("synch", False),
    )


def _search_alg(spec: SweepSpec, base: JobConfig, concurrency: int):
    """Tune's search algorithm. With ``search.include_base`` the first trial is the base job's own values of
    the searched keys (Tune's points_to_evaluate; it counts toward num_samples): with a deterministic job it
    reproduces the job run alone, the baseline the sweep set out to beat."""
    points = None
    if spec.search.get("include_base"):
        flat = base.flat()
        points = [{k: flat[k] for k in spec.params if k in flat}]
    name = spec.search["name"]
    if name in ("random", "grid"):
        # Tune's BasicVariantGenerator: random samples, grid_search expanded
        from ray.tune.search import BasicVariantGenerator

        # Tune wraps only Searchers (Optuna) in its ConcurrencyLimiter: this one takes the limit itself.
        return None if points is None else BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=base.train.seed, points_to_evaluate=points)


def check_trial_values(base: JobConfig, spec: SweepSpec) -> None:
    """Every distribution's bounds or choices must give a valid JobConfig (types, ranges), before Ray."""
    for key, dist in spec.params.items():
        (name, args), = dist.items()
        samples = args[:2] if name in ("uniform", "loguniform", "quniform", "randint") else args
        for value in samples:
            try:
                base.with_overrides({key: value}, source=f"{spec.source}: params.{key}")
            except ConfigError as e:
                raise ConfigError(str(e)) from None


@dataclass
class TrialRow:
    id: str
    params: dict[str, Any]
    val_top1: float | None
    epochs_run: int
    status: str


class ParentRunCallback:
    """Tune callback (driver side): best-so-far metric on the parent run, final status on each child."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        class _Impl(Callback):
            def __init__(self, uri: str, parent_run_id: str, metric: str, mode: str, epochs: int,
                         sweep_dir: str):
                self.uri, self.parent, self.metric, self.mode = uri, parent_run_id, metric, mode
                self.epochs, self.sweep_dir = epochs, sweep_dir
                self.best: float | None = None
                self.results = 0

            def on_trial_result(self, iteration, trials, trial, result, **info):
                import mlflow

                value = result.get(self.metric)
                if value is None:
                    return
                self.results += 1
                better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
                if better:
                    self.best = value
                mlflow.MlflowClient(self.uri).log_metric(self.parent, f"best_{self.metric}", self.best,
                                                         step=self.results)

            def _child(self, trial):
                import mlflow

                from vitlab.tracking import RUN_KEY_TAG

                client = mlflow.MlflowClient(self.uri)
                key = f"{self.sweep_dir}/trials/{trial.trial_id}"
                exp = client.get_run(self.parent).info.experiment_id
                found = client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
                return client, (found[0].info.run_id if found else None)

            def on_trial_complete(self, iteration, trials, trial, **info):
                client, child = self._child(trial)
                if child is None:
                    return
                epochs = int((trial.last_result or {}).get("epoch", 0))
                status = "completed" if epochs >= self.epochs else "stopped_early"
                client.set_tag(child, "vitlab.trial_status", status)
                if status == "stopped_early":
                    client.set_terminated(child, status="KILLED")

            def on_trial_error(self, iteration, trials, trial, **info):
                client, child = self._child(trial)
                if child is not None:
                    client.set_tag(child, "vitlab.trial_status", "errored")
                    client.set_terminated(child, status="FAILED")

        return _Impl(*args, **kwargs)


def sweep_name(cfg: JobConfig, space_path: str) -> str:
    return f"{cfg.run.name or 'vitlab'}-{Path(space_path).stem}"


def run_sweep(base: JobConfig, spec: SweepSpec, space_path: str, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the sweep; returns what --output-json writes."""
    from ray import tune

    from vitlab import tracking
    from vitlab.cluster import connect
    from vitlab.train.trainer import _run_tags, preflight, storage_root

    check_trial_values(base, spec)
    manifest, uri = preflight(base)
    # Trials run in their own working directories (and maybe on other nodes): pin paths and the tracking URI.
    base = base.with_overrides({"data.path": manifest.root, "tracking.uri": uri,
                                "run.storage_path": storage_root(base)})
    name = sweep_name(base, space_path)
    sweep_dir = f"{storage_root(base)}/{name}"
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise UserError(f"--resume: no sweep to resume at {sweep_dir}")
    if not resume and tune.Tuner.can_restore(sweep_dir):
        raise UserError(f"{sweep_dir}: a sweep of that name exists; pass --resume to continue it, or set run.name")
    connect()
    parent_params = {"space": json.dumps(spec.params), "scheduler": json.dumps(spec.scheduler),
                     "search": json.dumps(spec.search), "metric": spec.metric, "mode": spec.mode,
                     "num_samples": spec.num_samples, "job": json.dumps(base.to_dict())}
    parent_id, _ = tracking.start_run(uri, base.tracking.experiment, sweep_dir, name, parent_params,
                             {**_run_tags(base, manifest), "vitlab.kind": "sweep"}, resume=resume)
    concurrency = auto_concurrency(base) if spec.max_concurrent_trials == "auto" else spec.max_concurrent_trials
    log.info("sweep %s: %d trials, %d at a time, scheduler %s, search %s", name, spec.num_samples, concurrency,
             spec.scheduler["name"], spec.search["name"])
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), sweep_dir=sweep_dir, parent_run_id=parent_id),
        # The trial function only waits on its TorchTrainer: no CPU, just a token of memory (Tune needs a
        # non-empty request).
        {"CPU": 0, "memory": 64 * 1024**2},
    )
    callback = ParentRunCallback(uri, parent_id, spec.metric, spec.mode, base.train.epochs, sweep_dir)
    start = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from vitlab.tune.space import param_space

        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                max_concurrent_trials=concurrency, scheduler=_scheduler(spec, base.train.epochs),
                search_alg=_search_alg(spec, base, concurrency),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_root(base), callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors
    if finished < expected_trials(spec):
        # Tune returns normally after Ctrl-C (it saved its state): this is not the sweep's end.
        tracking.end_run(uri, parent_id, "KILLED")
        raise SweepInterrupted(f"sweep {name} interrupted with {finished} of {expected_trials(spec)} trials "
                               f"finished; continue it with the same command and --resume")
    return _finish(base, spec, grid, uri, parent_id, sweep_dir, time.perf_counter() - start)


def expected_trials(spec: SweepSpec) -> int:
    """num_samples, times every grid's size (Tune repeats the whole grid num_samples times)."""
    n = spec.num_samples
    for dist in spec.params.values():
        if "grid" in dist:
            n *= len(dist["grid"])
    return n


def _rows(grid, spec: SweepSpec, epochs: int) -> list[TrialRow]:
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = {k: v for k, v in (result.config or {}).items()}
        done = int(metrics.get("epoch", 0))
        if result.error is not None:
            status = "errored"
        else:
            status = "completed" if done >= epochs else "stopped_early"
        values = list(df[spec.metric].dropna()) if df is not None and spec.metric in df else []
        if not values and spec.metric in metrics:
            values = [metrics[spec.metric]]  # a PBT-restarted trial's dataframe can come back empty
        best = (max(values) if spec.mode == "max" else min(values)) if len(values) else None
        # the last epoch reached: Tune's dataframe starts over when PBT restores a trial from a donor
        epochs_run = done or (int(len(df)) if df is not None else 0)
        rows.append(TrialRow(trial_id, params, None if best is None else float(best), epochs_run, status))
    reverse = spec.mode == "max"
    rows.sort(key=lambda r: (r.val_top1 is None, -(r.val_top1 or 0) if reverse else (r.val_top1 or 0)))
    return rows


def _finish(base: JobConfig, spec: SweepSpec, grid, uri: str, parent_id: str, sweep_dir: str,
            seconds: float) -> dict[str, Any]:
    from vitlab import tracking
    from vitlab.train.state import atomic_write_text

    rows = _rows(grid, spec, base.train.epochs)
    best_row = next((r for r in rows if r.val_top1 is not None), None)
    art = tracking.temp_artifact_dir()
    files = [_trials_csv(rows, art / "trials.csv"), _curves_png(grid, spec, art / "trials_curves.png")]
    best_path = Path(sweep_dir) / BEST_FILE
    if best_row is not None:
        best_cfg = base.with_overrides({**best_row.params, "run.name": f"{Path(sweep_dir).name}-best"})
        atomic_write_text(best_path, "# the best trial's full JobConfig: vitlab train " + str(best_path) + "\n"
                          + best_cfg.to_yaml())
        files.append(best_path)
        tracking.log_artifacts(uri, parent_id, [best_path])
        files.append(_parallel_png(rows, spec, art / "parallel_coordinates.png"))
    tracking.log_artifacts(uri, parent_id, [f for f in files if f != best_path])
    tracking.end_run(uri, parent_id, "FINISHED")
    return {
        "mlflow_parent_run_id": parent_id,
        "tracking_uri": uri,
        "sweep_dir": sweep_dir,
        "best_config": str(best_path) if best_row else None,
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


def _curves_png(grid, spec: SweepSpec, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and spec.metric in df and "epoch" in df:
            ax.plot(df["epoch"], df[spec.metric], marker=".", label=Path(result.path).name[-12:])
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.metric} per epoch, all trials")
    ax.grid(alpha=0.3)
    if 0 < len(ax.lines) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _parallel_png(rows: list[TrialRow], spec: SweepSpec, out: Path) -> Path:
    """Parallel coordinates: one axis per searched key (log-scaled where the space is), then the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in spec.params if all(isinstance(r.params.get(k), (int, float)) for r in rows)]
    scored = [r for r in rows if r.val_top1 is not None]
    fig, ax = plt.subplots(figsize=(2 + 2 * (len(keys) + 1), 5))
    if scored:
        cols = []
        for k in keys:
            v = np.array([float(r.params[k]) for r in scored])
            if "loguniform" in spec.params[k]:
                v = np.log10(v)
            cols.append(v)
        cols.append(np.array([r.val_top1 for r in scored]))
        data = np.stack(cols, axis=1)
        lo, hi = data.min(axis=0), data.max(axis=0)
        norm = (data - lo) / np.where(hi > lo, hi - lo, 1)
        cmap = plt.get_cmap("viridis")
        score = norm[:, -1]
        for i in range(len(scored)):
            ax.plot(range(data.shape[1]), norm[i], color=cmap(score[i]), alpha=0.8)
        labels = [("log10 " if "loguniform" in spec.params[k] else "") + k for k in keys] + [spec.metric]
        ax.set_xticks(range(data.shape[1]), labels, rotation=20)
        for j in range(data.shape[1]):
            ax.text(j, -0.06, f"{lo[j]:.3g}", ha="center", fontsize=7)
            ax.text(j, 1.03, f"{hi[j]:.3g}", ha="center", fontsize=7)
    ax.set_yticks([])
    ax.set_title("trials: parallel coordinates (colour = metric)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
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


os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
