"""What the terminal shows (vitlab's lines, errors, tracebacks) and what only the log file gets; progress lines;
the manifest as MLflow dataset inputs; the profiler window's checks."""

from __future__ import annotations

import json
import logging

import pytest

from tests.support import tiny_job
from vitlab import lineage, logs
from vitlab.config import ConfigError
from vitlab.data.manifest import Manifest
from vitlab.progress import TrainProgress, duration, eta


@pytest.fixture
def routed(tmp_path, capsys):
    """logs.setup for one test, the root logger and the routing put back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._routing)
    path = tmp_path / "cmd.log"
    logs.setup(verbose=False, path=path)
    yield path
    for handler in root.handlers[:]:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    logs._routing = saved[2]
    logging.captureWarnings(False)


def test_terminal_shows_vitlab_and_errors_the_file_everything(routed, capsys):
    logging.getLogger("vitlab.train.run").info("MLflow run abc (new)")
    logging.getLogger("ray.data").info("Starting execution of Dataset train_0")
    logging.getLogger("ray._private.auth").warning("Token authentication is enabled")
    logging.getLogger("mlflow.store").error("database is locked")
    logging.getLogger("vitlab.cluster").warning("tracking http://user:secret@host unreachable")
    captured = capsys.readouterr()
    assert "ERROR" not in captured.out and "MLflow run abc" not in captured.err  # info: stdout, the rest: stderr
    err = captured.out + captured.err
    assert "MLflow run abc (new)" in err and "ERROR database is locked" in err
    assert "Starting execution" not in err and "Token authentication" not in err
    assert "WARNING tracking http://***@host unreachable" in err and "secret" not in err
    text = routed.read_text()
    assert all(s in text for s in ("MLflow run abc", "Starting execution", "Token authentication", "database"))
    assert "secret" not in text


def test_ray_output_routing(routed, capsys):
    printed = []
    worker = {"pid": 41, "actor_name": "RayTrainWorker", "is_err": True, "lines": [
        "Setting up process group for: env:// [rank=0, world_size=2]",
        f"{logs.WORKER_MARK}INFO epoch 1/2: train loss 2.2769, val top-1 0.1722",
        f"{logs.WORKER_MARK}WARNING restored from latest checkpoint of this run: epoch 1 done",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/x)",
        "Traceback (most recent call last):",
        '  File "loop.py", line 3, in train_one_epoch',
        "vitlab.train.loop.NonFiniteLossError: non-finite loss at step 7",
        "Reporting training result 1",
    ]}
    logs._route(worker, printed.append)
    logs._route({"pid": "raylet", "lines": ["A worker died or was killed (OOM)"]}, printed.append)
    startup = ("WARNING: 8 PYTHON worker processes have been started on node: 32e9 with address: 127.0.0.1, which "
               "is 4x the maximum expected startup concurrency (2). This could be a result of using many actors")
    logs._route({"pid": "raylet", "lines": [startup]}, printed.append)  # expected with a span's actors: file only
    # the raylet's notices reach the driver through Ray's error listener, which calls this printer by name
    import ray._private.worker as ray_worker

    logs.route_ray_output()
    ray_worker.print_to_stdstream({"pid": "raylet", "lines": [startup.replace("8 PYTHON", "9 PYTHON")]},
                                  ignore_prefix=False)
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "epoch 1/2: train loss 2.2769" in err and "WARNING restored from latest checkpoint" in err
    assert logs.WORKER_MARK not in err  # shown as vitlab's own lines, without the marker
    assert "(RayTrainWorker pid=41) Traceback (most recent call last):" in err
    assert "NonFiniteLossError: non-finite loss at step 7" in err
    assert "Setting up process group" not in err and "Checkpoint successfully" not in err
    assert "Reporting training result" not in err  # the traceback ended with its exception line
    assert printed == [{"pid": "raylet", "lines": ["A worker died or was killed (OOM)"]}]  # Ray prints the raylet's
    # the controller reports the same error: shown once, then named
    logs._route({**worker, "pid": 42, "actor_name": "TrainController", "lines": worker["lines"][4:7]}, printed.append)
    again = capsys.readouterr().err
    assert again.strip() == ("(TrainController pid=42) vitlab.train.loop.NonFiniteLossError: non-finite loss at "
                             "step 7  [traceback as above]"), again
    text = routed.read_text()
    assert startup in text and startup.replace("8 PYTHON", "9 PYTHON") in text
    assert "(RayTrainWorker pid=41) Setting up process group" in text and "Reporting training result 1" in text


def test_move_log_keeps_what_was_written(routed, tmp_path):
    logging.getLogger("vitlab").info("before the move")
    moved = logs.move_log(tmp_path / "run" / logs.LOG_FILE)
    logging.getLogger("vitlab").info("after the move")
    text = moved.read_text()
    assert "before the move" in text and "after the move" in text and not routed.exists()
    assert logs.log_path() == moved


def test_worker_marking_formats_every_line(monkeypatch, capsys):
    logger = logging.getLogger("vitlab")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    try:
        logs.mark_worker_logging()
        logs.mark_worker_logging()  # idempotent: one handler
        logging.getLogger("vitlab.train.loop").warning("two\nlines")
        err = capsys.readouterr().err
        assert err.splitlines() == [f"{logs.WORKER_MARK}WARNING two", f"{logs.WORKER_MARK}WARNING lines"]
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate, logger.level = saved[1], saved[2]


def test_durations_and_eta():
    assert duration(None) == "?" and duration(65) == "1:05" and duration(3725) == "1:02:05"
    assert eta(0, 10, 5) is None and eta(5, 10, 10) == pytest.approx(10)


def test_train_progress_line(monkeypatch):
    p = TrainProgress(epochs=3, steps_per_epoch=10, world=2, every_s=30)
    p.start_epoch()
    for _ in range(4):
        p.add(images=32, wait_s=0.0, loss=2.0)
    assert p.line(1, 4, 1e-3) is None  # not due yet
    p.ticker.last -= 31
    line = p.line(1, 4, 1e-3)
    assert line.startswith("epoch 1/3 step 4/10: ") and "img/s" in line and "loss 2.0000" in line
    assert "lr 0.001" in line and "ETA epoch " in line and ", run " in line
    assert p.micro == 0  # the window starts over


def test_progress_and_profile_keys_are_checked(tmp_path):
    cfg = tiny_job(tmp_path, "data/digits", "x", "train.profile_steps=[5, 8]", "train.log_every_seconds=10")
    assert cfg.train.profile_steps == (5, 8) and cfg.train.log_every_seconds == 10
    for bad in ("train.profile_steps=[8, 5]", "train.profile_steps=[-1, 2]", "train.log_every_seconds=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            tiny_job(tmp_path, "data/digits", "x", bad)


def test_manifest_splits_are_mlflow_datasets(tmp_path):
    data = {"classes": ["a", "b"], "format": "folders", "columns": {"image": "binary", "label": "int64"},
            "splits": {"train": {"rows": 12, "shards": [{"file": "train/0.parquet", "rows": 12}]},
                       "val": {"rows": 4, "shards": [{"file": "val/0.parquet", "rows": 4}]}}}
    manifest = Manifest(root=str(tmp_path / "shards"), data=data, sha256="ab" * 32)
    found = {context: ds for ds, context in lineage.manifest_datasets(manifest)}
    assert set(found) == {"training", "validation"}
    train = found["training"]._to_mlflow_entity()
    assert train.name == "shards/train" and train.digest == ("ab" * 32)[:36] and str(tmp_path) in train.source
    assert json.loads(train.profile)["rows"] == 12 and "label" in train.schema
    assert json.loads(found["validation"]._to_mlflow_entity().profile)["rows"] == 4


def test_third_party_console_handlers_are_adopted(routed, capsys):
    class FollowsStderr(logging.Handler):  # like torch's _StderrHandler: not a StreamHandler
        @property
        def stream(self):
            import sys

            return sys.stderr

        def emit(self, record):
            self.stream.write(record.getMessage() + "\n")

    logger = logging.getLogger("torch.utils.fake_ext")
    file_handler = logging.FileHandler(routed.parent / "theirs.log")
    logger.addHandler(FollowsStderr())
    logger.addHandler(file_handler)
    logger.propagate = False
    try:
        logs.adopt_third_party_loggers()
        logger.warning("No CUDA runtime is found")
        captured = capsys.readouterr()
        assert "No CUDA runtime" not in captured.out + captured.err  # not on the terminal
        assert "No CUDA runtime" in routed.read_text()  # in ours
        assert logger.handlers == [file_handler]  # their own file handler stays
    finally:
        logger.handlers.clear()
        file_handler.close()
