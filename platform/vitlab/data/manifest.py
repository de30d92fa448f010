"""Reading a prepared dataset's manifest.json: classes, splits and shard files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vitlab.errors import UserError
from vitlab.names import is_safe_name
from vitlab.train import storage

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    root: str  # the dataset directory (absolute) or URI
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

    def shard_rows(self, split: str) -> list[int]:
        """Rows of each of the split's shards, in manifest order."""
        return [int(s["rows"]) for s in self.data["splits"][split]["shards"]]

    def files(self, split: str) -> list[str]:
        """Absolute paths (or URIs) of the split's shards, in manifest order."""
        return [storage.join(self.root, s["file"]) for s in self.data["splits"][split]["shards"]]


def load_manifest(path: str) -> Manifest:
    """Load DIR/manifest.json; a missing or unfinished dataset is a UserError naming the path."""
    root = storage.absolute(path)
    target = storage.join(root, MANIFEST)
    if not storage.exists(target):
        raise UserError(
            f"{path}: no {MANIFEST} (expected a directory made by 'vitlab data prepare SOURCE --out {path}')"
        )
    raw = storage.read_bytes(target)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}/{MANIFEST}: not valid JSON ({e})") from None
    check_manifest(data, f"{path}/{MANIFEST}")
    return Manifest(root, data, hashlib.sha256(raw).hexdigest())


def check_manifest(data: Any, where: str) -> None:
    """The parts of a manifest that training reads: classes, and for each split its rows and shard files,
    each a relative path inside the dataset (a crafted manifest cannot point a reader outside it)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object (a vitlab manifest), got {type(data).__name__}")
    for key in ("classes", "splits"):
        if key not in data:
            raise UserError(f"{where}: missing '{key}' (expected a vitlab manifest)")
    if not isinstance(data["classes"], list) or not data["classes"]:
        raise UserError(f"{where}: 'classes' is {data['classes']!r} (expected a non-empty list of class names)")
    for split in ("train", "val"):
        entry = data["splits"].get(split) if isinstance(data["splits"], dict) else None
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not isinstance(entry.get("rows"), int):
            raise UserError(f"{where}: splits.{split} is missing or malformed (expected rows and a list of shards)")
        for shard in shards:
            file = shard.get("file") if isinstance(shard, dict) else None
            if not isinstance(file, str) or not all(is_safe_name(part) for part in file.split("/")):
                raise UserError(f"{where}: splits.{split}: shard file {file!r} (expected a path inside the dataset)")
