"""Reading a prepared dataset's manifest.json: classes, splits and shard files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vitlab.errors import UserError
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
    for key in ("classes", "splits"):
        if key not in data:
            raise UserError(f"{path}/{MANIFEST}: missing '{key}' (expected a vitlab manifest)")
    return Manifest(root, data, hashlib.sha256(raw).hexdigest())
