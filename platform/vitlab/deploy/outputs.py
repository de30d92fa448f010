"""Where `vitlab predict --out PREDICTIONS` writes: a directory of Parquet files plus ``_vitlab_predictions.json``
(the run's summary and the list of its files, written last), put in place whole.

* A local directory is built in a hidden sibling and swapped in (vitlab.outdir): PREDICTIONS is always the old
  predictions or the new ones, never a mix.
* Object storage has no rename: the Parquet files go under a fresh prefix ``PREDICTIONS/v-<id>/``, then the
  marker is written in one PUT naming them, then the files of the predictions it replaced are removed (as
  data/publish.py does for datasets). A run that fails removes its own prefix.

An existing PREDICTIONS is replaced only with --overwrite and only if vitlab wrote it (it holds the marker);
an empty directory is fine. Readers (pandas, pyarrow, Ray Data) skip the marker: its name starts with "_".
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vitlab import outdir
from vitlab.data import publish
from vitlab.errors import UserError
from vitlab.train import storage

MARKER = "_vitlab_predictions.json"


@dataclass
class Target:
    """One run's output: ``work`` is where the Parquet files go, ``final`` what the user named."""

    final: str  # absolute path or URI
    work: str
    version: str | None = None  # object storage: the v-<id> prefix of this run
    replaced: list[str] = field(default_factory=list)  # object storage: the old predictions' files


def check_out(out: str, overwrite: bool) -> None:
    """PREDICTIONS may be new or empty, or with --overwrite earlier predictions of vitlab: nothing else is ever
    replaced. Checked before Ray starts."""
    if storage.is_uri(out):
        fs, path = storage.filesystem(out)
        kind = fs.get_file_info(path).type
        names = storage.list_names(out) if kind == pafs.FileType.Directory else []
        if kind == pafs.FileType.File:
            raise UserError(f"--out {out}: an existing object (expected a new prefix for the Parquet files)")
        if names:
            _check_existing(out, MARKER in names, overwrite)
        return
    final = Path(out).resolve()
    outdir.recover(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"--out {out}: an existing file (expected a new directory for the Parquet files)")
    if any(final.iterdir()):
        _check_existing(out, (final / MARKER).is_file(), overwrite)


def _check_existing(out: str, ours: bool, overwrite: bool) -> None:
    if not ours:
        raise UserError(f"--out {out}: exists and is not predictions vitlab wrote (no {MARKER}); choose a new "
                        "--out or remove it yourself")
    if not overwrite:
        raise UserError(f"--out {out}: already holds predictions (pass --overwrite to replace them)")


def begin(out: str) -> Target:
    """A fresh place for this run's files."""
    if storage.is_uri(out):
        final, version = storage.absolute(out), publish.new_version()
        return Target(final, storage.join(final, version), version, _listed(final))
    final_dir = Path(out).resolve()
    return Target(str(final_dir), str(outdir.staging(final_dir)))


def written_files(target: Target) -> list[str]:
    """The Parquet files under ``target.work`` (sorted), as full paths or URIs."""
    fs, root = storage.filesystem(target.work)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    rels = sorted(i.path[len(root):].lstrip("/") for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    return [storage.join(target.work, r) for r in rels]


def commit(target: Target, summary: dict[str, Any], files: list[str]) -> None:
    """Write the marker (summary + files relative to PREDICTIONS) and put the predictions in place."""
    rel = [f[len(target.work):].lstrip("/") for f in files]
    if target.version:
        rel = [f"{target.version}/{r}" for r in rel]
    marker = json.dumps({**summary, "files": rel}, indent=2, default=str)
    if target.version is None:
        storage.write_text(storage.join(target.work, MARKER), marker)
        outdir.swap(Path(target.work), Path(target.final))
        return
    storage.write_text(storage.join(target.final, MARKER), marker)  # one PUT: readers see old or new
    publish.retire(target.final, target.replaced, keep=target.version)


def abort(target: Target) -> None:
    """Remove what this run wrote (after a failure)."""
    if target.version is None:
        shutil.rmtree(target.work, ignore_errors=True)
    else:
        publish.discard(target.work)


def _listed(out: str) -> list[str]:
    """The files (relative to PREDICTIONS) that an earlier run's marker lists; [] without one."""
    marker = storage.join(out, MARKER)
    if not storage.exists(marker):
        return []
    try:
        return list(json.loads(storage.read_bytes(marker)).get("files", []))
    except (json.JSONDecodeError, AttributeError):
        return []
