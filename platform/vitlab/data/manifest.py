"""Reading a prepared dataset's manifest.json: classes, splits and shard files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from vitlab.errors import UserError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    root: str  # the dataset directory or URI
    data: dict[str, Any]
    sha256: str  # of manifest.json's bytes (which hold every shard's sha256)

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    def rows(self, split: str) -> int:
        return int(self.data["splits"][split]["rows"])

    def files(self, split: str) -> list[str]:
        """Absolute paths (or URIs) of the split's shards, in manifest order."""
        return [f"{self.root}/{s['file']}" for s in self.data["splits"][split]["shards"]]

    def shard_rows(self, split: str) -> list[int]:
        return [int(s["rows"]) for s in self.data["splits"][split]["shards"]]


def load_manifest(path: str) -> Manifest:
    """Load DIR/manifest.json; a missing or unfinished dataset is a UserError naming the path."""
    root = path.rstrip("/")
    if "://" not in root:
        from pathlib import Path

        root = str(Path(root).resolve())
    fs, fs_root = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    target = f"{fs_root}/{MANIFEST}"
    if fs.get_file_info(target).type == pafs.FileType.NotFound:
        raise UserError(
            f"{path}: no {MANIFEST} (expected a directory made by 'vitlab data prepare SOURCE --out {path}')"
        )
    with fs.open_input_stream(target) as f:
        raw = f.read()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}/{MANIFEST}: not valid JSON ({e})") from None
    for key in ("classes", "splits"):
        if key not in data:
            raise UserError(f"{path}/{MANIFEST}: missing '{key}' (expected a vitlab manifest)")
    return Manifest(root, data, hashlib.sha256(raw).hexdigest())
