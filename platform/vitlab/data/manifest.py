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


def verify(path: str) -> dict[str, int]:
    """Check every shard against the manifest: its sha256 and its row count. A mismatch or a missing shard is a
    UserError naming the shard (the first one, and how many more). Returns {"shards": n, "rows": n, "bytes": n}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = load_manifest(path)
    problems: list[str] = []
    counts = {"shards": 0, "rows": 0, "bytes": 0}
    for split in manifest.data["splits"]:
        for shard in manifest.data["splits"][split]["shards"]:
            location = storage.join(manifest.root, shard["file"])
            try:
                data = storage.read_bytes(location)
            except OSError as e:
                problems.append(f"{location}: unreadable ({storage.first_line(e)})")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != shard.get("sha256"):
                expected = str(shard.get("sha256"))[:16]
                problems.append(f"{location}: sha256 {digest[:16]}..., the manifest says {expected}...")
                continue
            rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            if rows != shard.get("rows"):
                problems.append(f"{location}: {rows} rows, the manifest says {shard.get('rows')}")
                continue
            counts["shards"] += 1
            counts["rows"] += rows
            counts["bytes"] += len(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; prepare the dataset again")
    return counts
