"""What travels with a job: the working directory without data, runs, stores and VCS, and the vitlab package."""

import pytest

from vitlab.errors import UserError
from vitlab.jobs import MAX_WORKING_DIR_BYTES, stage, working_dir_files


def test_working_dir_leaves_out_data_runs_stores_and_vcs(tmp_path):
    root = tmp_path / "repo"
    files = ["jobs/a.yaml", "platform/vitlab/data/pipeline.py", "platform/vitlab/__init__.py", "README.md",
             "data/digits/manifest.json", "runs/x/checkpoint_1/state.pt", ".git/HEAD", ".venv/bin/python",
             "mlruns/0/meta.yaml", "mlflow.db", "platform/vitlab/__pycache__/cli.cpython-311.pyc", "notes/big.bin",
             "src/keep.py", ".gitignore", ".rayignore"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    (root / ".gitignore").write_text("/notes/\n")
    (root / ".rayignore").write_text("/src\n")
    got = {str(p) for p in working_dir_files(root)}
    assert got == {"jobs/a.yaml", "platform/vitlab/data/pipeline.py", "platform/vitlab/__init__.py", "README.md",
                   ".gitignore", ".rayignore"}
    wd, pkg = stage(root, tmp_path / "staged")
    assert (wd / "jobs" / "a.yaml").is_file() and (pkg / "jobs.py").is_file() and (pkg / "data").is_dir()
    assert (pkg / "deploy" / "bundle.py").is_file() and not list(pkg.rglob("__pycache__"))


def test_working_dir_too_big_is_refused(tmp_path):
    root = tmp_path / "repo"
    (root / "weights").mkdir(parents=True)
    with (root / "weights" / "model.bin").open("wb") as f:
        f.truncate(MAX_WORKING_DIR_BYTES + 1)  # sparse: no real disk used
    with pytest.raises(UserError, match=r"MiB to upload .*weights/model.bin"):
        stage(root, tmp_path / "staged")
