"""Search-space files: parsing, the registries, and every error naming its key (no Ray started)."""

import pytest

from tests.support import JOB, ROOT
from tests.support.cli import assert_one_line_error, run_cli
from vitlab.config import load_job
from vitlab.data.manifest import Manifest
from vitlab.errors import ConfigError
from vitlab.train.preflight import Checked
from vitlab.tune import space
from vitlab.tune.space import load_space
from vitlab.tune.sweep import base_point, check_trial_values


def write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def digits_like(rows: int = 1437) -> Checked:
    """What preflight finds for a 10-class dataset, without reading one."""
    data = {"classes": [str(i) for i in range(10)], "splits": {"train": {"rows": rows, "shards": []},
                                                               "val": {"rows": 360, "shards": []}}}
    return Checked(Manifest("/nowhere", data, "0" * 64), "sqlite:////nowhere/mlflow.db")


def test_shipped_spaces_parse():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        assert spec.params and spec.metric == "val_top1"
    pbt = load_space(ROOT / "search_spaces" / "digits_pbt.yaml")
    assert pbt.scheduler["name"] == "pbt" and "optim.lr" in pbt.scheduler["hyperparam_mutations"]


@pytest.mark.parametrize("text, message", [
    ("params:\n  optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n", r"optim\.lrr.*did you mean optim\.lr"),
    ("params:\n  optim.lr: {logunifrm: [1.0e-4, 1.0e-2]}\n", r"unknown distribution 'logunifrm'.*loguniform"),
    ("params:\n  optim.lr: {uniform: [1.0]}\n", r"uniform expects a list of 2 numbers"),
    ("params:\n  optim.lr: {loguniform: [0.0, 1.0]}\n", r"positive bounds"),
    ("params:\n  optim.lr: {uniform: [0.5, 0.1]}\n", r"low < high"),
    ("params:\n  model.kwargs.depth: {choice: []}\n", r"non-empty list"),
    ("scheduler: {name: asha2}\nparams:\n  optim.lr: {choice: [0.1]}\n", r"scheduler\.name.*asha"),
    ("scheduler: {name: asha, grace: 2}\nparams:\n  optim.lr: {choice: [0.1]}\n",
     r"scheduler\.grace: not an option of asha; expected grace_period"),
    ("mode: up\nparams:\n  optim.lr: {choice: [0.1]}\n", r"mode: expected max or min"),
    ("metric: val_acc\nparams:\n  optim.lr: {choice: [0.1]}\n", r"metric: 'val_acc' is not reported.*val_top1"),
    ("num_samples: lots\nparams:\n  optim.lr: {choice: [0.1]}\n", r"num_samples: expected an integer"),
    ("metrik: val_top1\nparams:\n  optim.lr: {choice: [0.1]}\n", r"unknown key 'metrik'.*metric"),
    ("search: {name: random, include_bse: true}\nparams:\n  optim.lr: {choice: [0.1]}\n", r"search\.include_bse"),
    ("search: {name: random, include_base: true}\nparams:\n  optim.lr: {grid: [0.1, 0.2]}\n", r"not with a grid"),
    ("search: {name: optuna}\nparams:\n  optim.lr: {grid: [0.1, 0.2]}\n", r"grid needs search\.name random, grid"),
    ("scheduler: {name: pbt, hyperparam_mutations: {optim.lrx: {uniform: [0.1, 0.2]}}}\n"
     "params:\n  optim.lr: {choice: [0.1]}\n", r"optim\.lrx"),
])
def test_space_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, text))


def test_scheduler_options_get_their_defaults(tmp_path):
    spec = load_space(write(tmp_path, "scheduler: {name: asha, grace_period: 4}\nparams:\n"
                                      "  optim.lr: {choice: [0.1]}\n"))
    assert spec.scheduler == {"name": "asha", "grace_period": 4, "reduction_factor": 3, "brackets": 1}
    assert set(space.SCHEDULERS) == {"fifo", "asha", "hyperband", "pbt"}
    assert set(space.SEARCHERS) == {"random", "grid", "optuna"}
    assert set(space.DISTRIBUTIONS) == {"uniform", "loguniform", "quniform", "randint", "choice", "grid"}


def test_trial_values_are_checked_against_the_schema_and_the_model(tmp_path):
    spec = load_space(write(tmp_path, "params:\n  train.epochs: {choice: [2, 'many']}\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        check_trial_values(load_job(JOB), spec, digits_like())
    # a value the schema takes but timm cannot build: caught on the driver, before any trial
    spec = load_space(write(tmp_path, "params:\n  model.kwargs.num_heads: {choice: [3, 5]}\n"))
    with pytest.raises(ConfigError, match=r"model\.kwargs: timm cannot build"):
        check_trial_values(load_job(JOB), spec, digits_like())
    spec = load_space(write(tmp_path, "params:\n  train.batch_size: {choice: [64, 4096]}\n"))
    with pytest.raises(ConfigError, match=r"train\.batch_size=4096: larger than the train split"):
        check_trial_values(load_job(JOB), spec, digits_like())


def test_include_base_tries_the_job_values_first(tmp_path):
    spec = load_space(write(tmp_path, "search: {name: random, include_base: true}\nparams:\n"
                                      "  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                      "  model.kwargs.depth: {choice: [2, 4]}\n"))
    base = load_job(JOB)
    alg = space.search_alg(spec, base_point(spec, base), base.train.seed, concurrency=1)
    assert alg._points_to_evaluate == [{"optim.lr": base.optim.lr, "model.kwargs.depth": base.model.kwargs["depth"]}]
    assert alg.max_concurrent == 1  # Tune leaves a BasicVariantGenerator instance unlimited otherwise


def test_cli_misspelt_key_exit_2(tmp_path):
    space_file = write(tmp_path, "params:\n  optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert_one_line_error(run_cli("sweep", JOB, space_file), "did you mean optim.lr")
    assert_one_line_error(run_cli("sweep", JOB, ROOT / "search_spaces" / "digits_asha.yaml",
                                  "--num-samples", "0"), "--num-samples 0: expected at least 1")


def test_an_exploit_runs_one_generation_past_the_trials_latest(tmp_path):
    """Not the donor's generation + 1: a trial exploiting a generation-0 donor a second time would land in its
    own earlier _g1 run and continue that run's weights."""
    from vitlab.tune.sweep import next_generation

    assert next_generation(str(tmp_path), "ab12_00001") == 1  # no trials/ directory yet
    for name in ["ab12_00001", "ab12_00001_g1", "ab12_00001_g3", "ab12_000010_g7", "ab12_00002_g5", "pbt_donors"]:
        (tmp_path / "trials" / name).mkdir(parents=True)
    assert next_generation(str(tmp_path), "ab12_00001") == 4
    assert next_generation(str(tmp_path), "ab12_00003") == 1
