"""train/storage: one path helper for local paths and URIs (file:// here; s3:// goes the same way)."""

import torch

from vitlab.config import load_job
from vitlab.train import storage


def test_paths_and_uris_read_and_write_the_same(tmp_path):
    for location in (str(tmp_path / "a" / "x.txt"), (tmp_path / "b" / "x.txt").as_uri()):
        assert not storage.exists(location)
        storage.write_text(location, "hello")
        assert storage.exists(location) and storage.read_bytes(location) == b"hello"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt"]  # no temporary file left
    assert storage.list_names(str(tmp_path / "b")) == ["x.txt"] and storage.list_names(str(tmp_path / "c")) == []


def test_save_torch_answers_where_it_went(tmp_path):
    uri = (tmp_path / "run" / "best_model.pt").as_uri()
    assert storage.save_torch({"w": torch.ones(2)}, uri) == uri  # a URI stays a URI
    assert torch.load(tmp_path / "run" / "best_model.pt")["w"].tolist() == [1.0, 1.0]
    local = storage.save_torch({"w": torch.zeros(1)}, str(tmp_path / "best_model.pt"))
    assert local == str(tmp_path / "best_model.pt")


def test_run_dirs_follow_the_storage_env(tmp_path, monkeypatch):
    cfg = load_job(None, ["run.name=x", "run.storage_path=runs"])
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage.run_dir(cfg) == str(tmp_path / "runs" / "x")
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://bucket/vitlab/")
    assert storage.run_dir(cfg) == "s3://bucket/vitlab/runs/x"  # a relative storage path goes under it
    assert storage.run_dir(cfg.with_overrides({"run.storage_path": "/abs"})) == "/abs/x"
    (tmp_path / "runs" / "x" / "checkpoint_000001").mkdir(parents=True)
    assert storage.has_checkpoints(str(tmp_path / "runs" / "x")) and not storage.has_checkpoints(str(tmp_path))


def test_a_ray_checkpoint_path_on_s3_becomes_a_uri(tmp_path):
    """Ray's Checkpoint.path drops the scheme on remote storage: what a sweep's pointer (and --resume-from) needs
    is the s3:// URI; a local run keeps its path."""
    remote = load_job(None, ["run.name=t_g1", "run.storage_path=s3://vitlab/runs/sw/trials"])
    assert storage.checkpoint_location(remote, "vitlab/runs/sw/trials/t_g1/checkpoint_2026-11-28_13-00-00.1") == \
        "s3://vitlab/runs/sw/trials/t_g1/checkpoint_2026-11-28_13-00-00.1"
    local = load_job(None, ["run.name=t", f"run.storage_path={tmp_path}"])
    path = str(tmp_path / "t" / "checkpoint_1")
    assert storage.checkpoint_location(local, path) == path


def test_copy_dir_and_remove_dir_on_paths_and_uris(tmp_path):
    source = tmp_path / "checkpoint_1"
    source.mkdir()
    (source / "state.pt").write_bytes(b"weights")
    (source / "metrics.json").write_text("{}")
    for copy in (str(tmp_path / "copies" / "a" / "checkpoint"), (tmp_path / "copies" / "b" / "checkpoint").as_uri()):
        storage.copy_dir(str(source), copy)  # its parents are made on the way
        assert sorted(storage.list_names(copy)) == ["metrics.json", "state.pt"]
        assert storage.read_bytes(storage.join(copy, "state.pt")) == b"weights"
    storage.remove_dir(str(tmp_path / "copies" / "a"))
    storage.remove_dir(str(tmp_path / "copies" / "a"))  # nothing there: nothing to do
    assert storage.list_names(str(tmp_path / "copies")) == ["b"] and (source / "state.pt").is_file()
