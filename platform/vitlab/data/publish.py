"""Publishing a prepared dataset to object storage, which has no atomic rename: as table formats do.

Each prepare writes its shards under a fresh prefix, ``OUT/v-<id>/``, and writes ``OUT/manifest.json`` last, in
one PUT, pointing at that prefix. A reader sees the old manifest and the old shards, or the new manifest and
the new shards, never a mix. A prepare that fails removes its own prefix; one that succeeds then removes the
shards that the replaced manifest listed (vitlab wrote them), and nothing else.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pyarrow.fs as pafs

from vitlab.data.manifest import MANIFEST
from vitlab.train import storage

log = logging.getLogger(__name__)


def new_version() -> str:
    return f"v-{uuid.uuid4().hex[:12]}"


def under(version: str, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard summaries with their files relative to OUT (``v-<id>/train/00000.parquet``)."""
    return [{**s, "file": f"{version}/{s['file']}" if s["file"] else ""} for s in summaries]


def listed_files(out: str) -> list[str]:
    """The shard files (relative to OUT) that OUT's current manifest lists; [] without one."""
    target = storage.join(out, MANIFEST)
    if not storage.exists(target):
        return []
    data = json.loads(storage.read_bytes(target))
    return [s["file"] for split in data["splits"].values() for s in split["shards"]]


def discard(prefix: str) -> None:
    """Remove a directory or prefix vitlab wrote (after a failure), warning rather than raising when it cannot."""
    try:
        storage.remove_dir(prefix)
    except OSError as e:
        log.warning("could not remove %s (%s)", prefix, storage.first_line(e))


def retire(out: str, files: list[str], keep: str) -> None:
    """Remove the replaced manifest's shards (not those under ``keep``, the new version's prefix)."""
    fs, root = storage.filesystem(out)
    for rel in files:
        if rel.startswith(f"{keep}/"):
            continue
        try:
            fs.delete_file(f"{root}/{rel}")
        except (FileNotFoundError, OSError) as e:
            log.warning("old shard %s/%s not removed (%s)", out, rel, storage.first_line(e))
    for version in {rel.split("/", 1)[0] for rel in files if rel.startswith("v-") and "/" in rel} - {keep}:
        info = fs.get_file_info(pafs.FileSelector(f"{root}/{version}", recursive=True, allow_not_found=True))
        if not any(i.type == pafs.FileType.File for i in info):
            discard(storage.join(out, version))  # the emptied prefix
