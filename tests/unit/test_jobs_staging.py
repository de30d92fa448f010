"""What travels with a job: the working directory without data, runs, stores, VCS and secrets, and the vitlab
package."""

import pytest

from vitlab.errors import UserError
from vitlab.upload import MAX_WORKING_DIR_BYTES, stage, working_dir_files


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
    got = {str(p) for p in working_dir_files(root).files}
    assert got == {"jobs/a.yaml", "platform/vitlab/data/pipeline.py", "platform/vitlab/__init__.py", "README.md",
                   ".gitignore", ".rayignore"}
    wd, pkg, _ = stage(root, tmp_path / "staged")
    assert (wd / "jobs" / "a.yaml").is_file() and (pkg / "jobs.py").is_file() and (pkg / "data").is_dir()
    assert (pkg / "deploy" / "bundle.py").is_file() and not list(pkg.rglob("__pycache__"))


def test_working_dir_too_big_is_refused(tmp_path):
    root = tmp_path / "repo"
    (root / "weights").mkdir(parents=True)
    with (root / "weights" / "model.bin").open("wb") as f:
        f.truncate(MAX_WORKING_DIR_BYTES + 1)  # sparse: no real disk used
    with pytest.raises(UserError, match=r"MiB to upload .*weights/model.bin"):
        stage(root, tmp_path / "staged")


SECRETS = [".env", "config/.env.production", "deploy/prod.env", ".netrc", ".pgpass", ".pypirc", ".git-credentials",
           "certs/server.pem", "certs/server.key", "keys/id_rsa", "keys/id_ed25519.pub", ".aws/credentials",
           ".aws/config", ".ssh/config", ".ray/auth_token", "auth_token", ".kube/config", ".docker/config.json",
           "gcloud/application_default_credentials.json", "creds/credentials.json", "store.p12"]


def test_secrets_stay_home_unless_included(tmp_path):
    root = tmp_path / "repo"
    for f in [*SECRETS, "jobs/a.yaml", "environment.yml", "keys/README.md"]:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("SECRET-VALUE")
    taken = working_dir_files(root)
    assert {str(p) for p in taken.files} == {"jobs/a.yaml", "environment.yml", "keys/README.md"}
    assert set(taken.secrets) == {s for s in SECRETS if not s.startswith((".aws/", ".ssh/", ".ray/", ".kube/",
                                                                            ".docker/", "gcloud/"))} | {
        ".aws/", ".ssh/", ".ray/", ".kube/", ".docker/", "gcloud/"}
    wd, _, _ = stage(root, tmp_path / "staged")
    assert not [p for p in wd.rglob("*") if p.is_file() and p.read_text() == "SECRET-VALUE" and
                p.name not in ("a.yaml", "environment.yml", "README.md")]
    forced = working_dir_files(root, include=("deploy/prod.env", ".aws"))
    assert {"deploy/prod.env", ".aws/credentials", ".aws/config"} <= {str(p) for p in forced.files}


def test_a_symlink_out_of_the_working_dir_is_refused(tmp_path):
    root = tmp_path / "repo"
    (root / "jobs").mkdir(parents=True)
    (root / "jobs" / "a.yaml").write_text("x")
    (root / "jobs" / "same.yaml").symlink_to(root / "jobs" / "a.yaml")  # inside: fine
    (tmp_path / "private.txt").write_text("not yours")
    assert {str(p) for p in working_dir_files(root).files} == {"jobs/a.yaml", "jobs/same.yaml"}
    (root / "notes.txt").symlink_to(tmp_path / "private.txt")
    with pytest.raises(UserError, match=r"notes.txt is a symlink to .*private.txt, outside the working directory"):
        stage(root, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()
