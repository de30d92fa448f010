"""Where things live: run directories, datasets and outputs as local paths or URIs (s3://, gs://, file://).

Every path that may be in object storage goes through ``filesystem()``: a pyarrow filesystem and the path
inside it, ``LocalFileSystem`` for a plain path. An object store has no rename, so writes here put a whole
object at once (``write_bytes``), and a local write goes to a temporary name first and is renamed.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from vitlab.config import JobConfig
from vitlab.errors import UserError

BEST_MODEL_FILE = "best_model.pt"
# On a cluster, where a relative run.storage_path goes (e.g. s3://bucket/vitlab; cluster.yaml sets it on every
# node): every node must see the same checkpoints, and a node's local disk is not shared.
STORAGE_ENV = "VITLAB_STORAGE_PATH"


def is_uri(location: str) -> bool:
    return "://" in location


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow.fs URI; a URI pyarrow cannot open is a
    UserError naming it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise UserError(f"{location}: cannot open ({first_line(e)})") from None
    return fs, path.rstrip("/") or "/"


def absolute(location: str) -> str:
    """A URI as given (without a trailing slash), a local path made absolute."""
    return location.rstrip("/") if is_uri(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def basename(location: str) -> str:
    """The last component of a path or URI (pathlib would turn s3://b/k into s3:/b/k on the way)."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def _temp_beside(path: str) -> str:
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"


def write_bytes(location: str, data) -> None:
    """Write a whole file (``data``: bytes or a pyarrow Buffer): a temporary name and a rename on local disk,
    one PUT in object storage (an object appears whole or not at all), so a crash never leaves a file that
    looks finished."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = _temp_beside(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def save_torch(obj, location: str) -> str:
    """torch.save ``obj`` to a location, as ``write_bytes`` would (atomic locally, one upload to object
    storage, through a temporary file rather than memory); returns the location."""
    import torch

    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):  # a path, or a file:// URI
        tmp = _temp_beside(path)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    else:
        with tempfile.TemporaryDirectory(prefix="vitlab-save-") as tmp:
            local = f"{tmp}/object.pt"
            torch.save(obj, local)
            pafs.copy_files(local, path, destination_filesystem=fs)
    return location if is_uri(location) else path


def copy_dir(source: str, destination: str) -> None:
    """Copy a directory (local or object storage, either side) file by file; a file that goes while it is being
    copied raises (FileNotFoundError, an OSError)."""
    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    destination_fs.create_dir(destination_path, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                    destination_filesystem=destination_fs)


def remove_dir(location: str) -> None:
    """Delete a directory vitlab wrote, and all under it (nothing when it is not there)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_names(location: str) -> list[str]:
    """Base names directly under a directory or prefix ([] when it does not exist)."""
    fs, path = filesystem(location)
    try:
        return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------
# Run directories


def storage_root(cfg: JobConfig) -> str:
    """run.storage_path as a URI or absolute path; a relative one goes under $VITLAB_STORAGE_PATH when set."""
    path = cfg.run.storage_path
    base = os.environ.get(STORAGE_ENV, "").rstrip("/")
    if base and not is_uri(path) and not Path(path).is_absolute():
        return absolute(join(base, path))
    return absolute(path)


def run_dir(cfg: JobConfig) -> str:
    return join(storage_root(cfg), cfg.run.name or "vitlab")


def checkpoint_names(location: str) -> list[str]:
    """The checkpoint_* directories of a Train run directory, oldest first (their names carry the time)."""
    return sorted(name for name in list_names(location)
                  if name.startswith("checkpoint_") and not name.endswith(".json"))  # not Ray's manager snapshot


def has_checkpoints(location: str) -> bool:
    """Whether a Train run directory already holds checkpoints (so a run there resumes)."""
    return bool(checkpoint_names(location))


def checkpoint_location(cfg: JobConfig, checkpoint_path: str) -> str:
    """A checkpoint as a local path, or for remote storage its URI (Ray's Checkpoint.path drops the scheme)."""
    root = run_dir(cfg)
    return join(root, basename(checkpoint_path)) if is_uri(root) else str(checkpoint_path)
