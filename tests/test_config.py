import subprocess

import pytest

from helpers import VITLAB
from vitlab.config import JobConfig, load_job
from vitlab.errors import ConfigError


def test_yaml_plus_overrides_are_coerced(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("optim: {lr: 1.0e-3}\ntrain: {epochs: 2, batch_size: 8}\nscaling: {num_workers: 2}\n")
    cfg = load_job(job, ["optim.lr=3e-4", "train.epochs=5", "scaling.use_gpu=false", "model.kwargs.depth=2",
                         "data.scale=[0.5, 1.0]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 8
    assert cfg.scaling.use_gpu is False
    assert cfg.model.kwargs == {"depth": 2}
    assert cfg.data.scale == (0.5, 1.0)
    assert cfg.run.name == "job"  # from the file name
    flat = cfg.flat()
    for key in ("data.path", "train.epochs", "train.batch_size", "scaling.num_workers", "optim.lr", "tracking.uri",
                "run.storage_path", "model.name", "model.kwargs.depth"):
        assert key in flat


def test_unknown_key_names_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean optim\.lr"):
        load_job(None, ["optim.lrr=1"])
    job = tmp_path / "bad.yaml"
    job.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochz.*train\.epochs"):
        load_job(job)


def test_wrong_type_and_value_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs.*'abc'"):
        load_job(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_job(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"batch_size=10.*num_workers=3"):
        load_job(None, ["train.batch_size=10", "scaling.num_workers=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_round_trip_yaml():
    cfg = load_job(None, ["optim.lr=0.01", "model.kwargs.depth=3"])
    again = JobConfig.model_validate(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_cli_config_error_is_one_line_exit_2():
    proc = subprocess.run([VITLAB, "train", "jobs/digits_vit.yaml", "optim.lrr=1"], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
