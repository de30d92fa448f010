"""What a run was trained on, as MLflow dataset inputs: the manifest's train and val splits.

Each split is a dataset named ``<data dir>/<split>`` whose digest is the manifest's sha256 (cut to MLflow's 36
characters; the whole hash is the run's ``manifest.sha256`` tag), whose source is the data path, and whose
schema and profile are the shards' columns, rows, shards and classes. Runs on the same shards share the
digest; the MLflow UI's Dataset column shows them.
"""

from __future__ import annotations

import json
import warnings

from vitlab.data.manifest import Manifest
from vitlab.redact import redact
from vitlab.train.storage import basename

CONTEXTS = {"train": "training", "val": "validation"}  # split -> mlflow.data.context
_COLUMN_TYPES = {"binary": "binary", "large_binary": "binary", "int64": "long", "int32": "integer",
                 "string": "string", "large_string": "string", "double": "double", "float": "float"}
MLFLOW_DIGEST_CHARS = 36


def manifest_datasets(manifest: Manifest) -> list[tuple[object, str]]:
    """(MLflow dataset, context) of each split that has rows."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    class ManifestDataset(MetaDataset):
        def __init__(self, profile: dict, **kwargs):
            self._profile = profile
            super().__init__(**kwargs)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    columns = manifest.data.get("columns") or {}
    schema = Schema([ColSpec(_COLUMN_TYPES.get(t, "string"), name) for name, t in columns.items()]) \
        if columns else None
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local-file source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(redact(manifest.root))
    found = []
    for split, context in CONTEXTS.items():
        if not manifest.rows(split):
            continue
        profile = {"rows": manifest.rows(split), "shards": len(manifest.files(split)),
                   "num_classes": manifest.num_classes, "manifest_sha256": manifest.sha256,
                   "format": manifest.data.get("format")}
        dataset = ManifestDataset(profile, source=source, name=f"{basename(manifest.root)}/{split}",
                                  digest=manifest.sha256[:MLFLOW_DIGEST_CHARS], schema=schema)
        found.append((dataset, context))
    return found


def log_manifest_inputs(client, run_id: str, manifest: Manifest) -> None:
    """The manifest's splits as the run's dataset inputs (context training / validation)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, datasets=[
        DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for dataset, context in manifest_datasets(manifest)
    ])
