import pytest
import yaml

from tests.support import JOB
from tests.support.cli import assert_one_line_error, run_cli
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
    # a mid-epoch position needs the epoch's order: no local shuffle buffer
    with pytest.raises(ConfigError, match=r"data\.shuffle_buffer must be 0 with run\.checkpoint_every_steps"):
        load_job(None, ["run.checkpoint_every_steps=100", "data.shuffle_buffer=512"])
    assert load_job(None, ["run.checkpoint_every_steps=100", "data.repeated_aug=3"]).positional_stream
    # elastic workers: [min, max], the global batch divides over max, the stream is positional
    elastic = load_job(None, ["scaling.num_workers=[1, 4]", "train.batch_size=64"])
    assert elastic.scaling.elastic and elastic.scaling.max_workers == 4 and elastic.positional_stream
    with pytest.raises(ConfigError, match=r"scaling\.num_workers.*1 <= min <= max"):
        load_job(None, ["scaling.num_workers=[3, 2]"])
    with pytest.raises(ConfigError, match=r"batch_size=10.*num_workers=4"):
        load_job(None, ["scaling.num_workers=[1, 4]", "train.batch_size=10"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_round_trip_yaml():
    cfg = load_job(None, ["optim.lr=0.01", "model.kwargs.depth=3"])
    assert JobConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg
    assert JobConfig.from_yaml(cfg.to_yaml(), "again.yaml") == cfg  # the one loader reads what it writes


def test_from_yaml_names_its_source_and_takes_overrides():
    text = "optim: {lr: 1.0e-3}\n"
    assert JobConfig.from_yaml(text, "x", ["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match=r"^ckpt/config\.yaml: optim\.lr"):
        JobConfig.from_yaml("optim: {lr: -1}\n", "ckpt/config.yaml")
    with pytest.raises(ConfigError, match=r"^a\.yaml: expected a mapping of sections"):
        JobConfig.from_yaml("- 1\n- 2\n", "a.yaml")


def test_non_utf8_job_file_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train: {epochs: 2}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_job(bad)


def test_cli_config_error_is_one_line_exit_2():
    assert_one_line_error(run_cli("train", JOB, "optim.lrr=1"), "did you mean optim.lr")
