"""What travels with a job: a filtered copy of the working directory and the vitlab package.

Left out of the working directory: data, runs, MLflow stores, virtualenvs and VCS folders (they are large
and the cluster has its own); what .gitignore and .rayignore list; and secrets by their usual names (SECRETS),
unless named with ``--include``. A symlinked file that points outside the working directory is refused:
copying it would upload whatever it points at.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import vitlab
from vitlab.errors import UserError

log = logging.getLogger(__name__)

# Ray refuses runtime-env packages above 512 MiB (its gRPC limit) and uploads them through the head's GCS;
# a working directory is code and configs, so anything near this size is data that belongs in S3.
MAX_WORKING_DIR_BYTES = 100 * 1024**2
# Not uploaded: top-level entries of the working directory ...
TOP_LEVEL_EXCLUDES = {".git", ".venv", "venv", "data", "runs", "mlruns", "mlartifacts", "mlflow.db",
                      ".pytest_cache", ".ruff_cache", ".mypy_cache", "build", "dist"}
# ... and names at any depth (the package's own `vitlab/data` subpackage must stay, hence two lists).
ANY_LEVEL_EXCLUDES = {"__pycache__", ".DS_Store", ".ipynb_checkpoints"}
ANY_LEVEL_SUFFIXES = (".pyc", ".egg-info", ".db", ".tmp")
# Secrets, at any depth: folders of credentials, and files by name (fnmatch patterns). README lists them.
SECRET_DIRS = {".aws", ".ssh", ".ray", ".gnupg", ".kube", ".docker", ".azure", "gcloud"}
SECRETS = (".env", ".env.*", "*.env", ".netrc", "_netrc", ".pgpass", ".pypirc", ".npmrc", ".git-credentials",
           "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
           "auth_token", "credentials", "credentials.json", "*.tfstate")


@dataclass
class WorkingDir:
    root: Path
    files: list[Path] = field(default_factory=list)  # relative paths, uploaded
    secrets: list[str] = field(default_factory=list)  # relative paths left out as secrets ('dir/' for a folder)


def _excluded(rel: Path) -> bool:
    name = rel.name
    if len(rel.parts) == 1 and name in TOP_LEVEL_EXCLUDES:
        return True
    return name in ANY_LEVEL_EXCLUDES or name.endswith(ANY_LEVEL_SUFFIXES)


def _is_secret(rel: Path, is_dir: bool) -> bool:
    if is_dir:
        return rel.name in SECRET_DIRS
    return any(fnmatch.fnmatch(rel.name, pattern) for pattern in SECRETS)


def _forced(rel: Path, include: tuple[str, ...]) -> bool:
    """Named by --include: the path itself or a folder it is in (``--include .aws`` sends .aws/credentials)."""
    return any(fnmatch.fnmatch(str(p), pattern.rstrip("/")) for p in (rel, *rel.parents) for pattern in include)


def _ignore_spec(root: Path):
    """The working directory's own .gitignore and .rayignore, matched the way Ray's packager matches them
    (its vendored gitwildmatch PathSpec), so the size check counts what Ray would upload."""
    lines = []
    for name in (".gitignore", ".rayignore"):
        f = root / name
        if f.is_file():
            lines += f.read_text().splitlines()
    if not lines:
        return None
    try:
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:  # a future Ray moved it: its packager still applies the files on upload
        return None
    return PathSpec.from_lines("gitwildmatch", lines)


def _check_link(root: Path, path: Path, rel: Path) -> None:
    target = path.resolve()
    if target != root and root not in target.parents:
        raise UserError(f"--working-dir {root}: {rel} is a symlink to {target}, outside the working directory "
                        "(it would upload that file); remove it, list it in .rayignore, or copy the file in")


def working_dir_files(root: str | Path, include: tuple[str, ...] = ()) -> WorkingDir:
    """What of ``root`` is uploaded as the job's working directory, and which secrets were left out."""
    out = WorkingDir(Path(root).resolve())
    spec = _ignore_spec(out.root)
    for dirpath, dirnames, filenames in os.walk(out.root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            rel = (here / d).relative_to(out.root)
            if (here / d).is_symlink() or _excluded(rel) or (spec and spec.match_file(f"{rel}/")):
                continue
            if _is_secret(rel, is_dir=True) and not _forced(rel, include):
                out.secrets.append(f"{rel}/")
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = (here / f).relative_to(out.root)
            if _excluded(rel) or (spec and spec.match_file(str(rel))) or not (here / f).is_file():
                continue
            if _is_secret(rel, is_dir=False) and not _forced(rel, include):
                out.secrets.append(str(rel))
                continue
            if (here / f).is_symlink():
                _check_link(out.root, here / f, rel)
            out.files.append(rel)
    out.files.sort()
    out.secrets.sort()
    return out


def _copy_tree(src: Path, files: list[Path], dst: Path) -> int:
    total = 0
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        total += target.stat().st_size
    return total


def stage(working_dir: str | Path, dst: Path, include: tuple[str, ...] = ()) -> tuple[Path, Path, WorkingDir]:
    """Copy what the job needs into ``dst``: the filtered working directory and the vitlab package.
    Returns (working_dir copy, package copy, what was taken and left out). Raises UserError when the working
    directory is too big or holds a symlink out of it."""
    src = Path(working_dir).resolve()
    if not src.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    taken = working_dir_files(src, include)
    sizes = {rel: (src / rel).stat().st_size for rel in taken.files}
    total = sum(sizes.values())
    if total > MAX_WORKING_DIR_BYTES:
        largest = ", ".join(f"{rel} ({n / 1024**2:.0f} MiB)" for rel, n in
                            sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise UserError(f"--working-dir {src}: {total / 1024**2:.0f} MiB to upload (limit "
                        f"{MAX_WORKING_DIR_BYTES // 1024**2} MiB); largest: {largest}. Keep data in S3 or list "
                        "it in .rayignore")
    wd = dst / "working_dir"
    wd.mkdir(parents=True)
    _copy_tree(src, taken.files, wd)
    pkg_src = Path(vitlab.__file__).resolve().parent
    pkg = dst / "py_modules" / "vitlab"
    pkg_files = [f.relative_to(pkg_src) for f in pkg_src.rglob("*") if f.is_file()
                 and not any(p in ANY_LEVEL_EXCLUDES for p in f.relative_to(pkg_src).parts)
                 and not f.name.endswith(ANY_LEVEL_SUFFIXES)]
    _copy_tree(pkg_src, pkg_files, pkg)
    log.info("job working dir: %d files, %.1f MiB from %s", len(taken.files), total / 1024**2, src)
    return wd, pkg, taken
