"""`vitlab predict MODEL DATA --out PREDICTIONS`: batch prediction on Ray Data, written as Parquet.

DATA is a prepared dataset (a directory or URI with manifest.json: one split's shards, with their labels), or
image files and folders (local paths or URIs such as s3://bucket/images/), without labels.

The pipeline (--compute tasks, the default): a dataset of the inputs (shard indices, or the listed image files in
chunks), then one map of Ray tasks of ``--threads`` CPUs that read a block, decode it with the val preprocessing
of training (``bundle.decode``, the val pipeline's decode_val), normalise it, run torch or onnxruntime (an
export directory) and keep the top-k, with the Parquet write fused into the same tasks. Each worker process
loads the model once (a module-level cache keyed by the model's hash): tasks start on the worker processes
Ray already runs, where an actor pool's start (its own processes, then the model) and the separate read and
write tasks cost more than 1,000 small images do on a small machine (docs/benchmarks.md). --compute actors:
zero-CPU read tasks, then an actor pool holding the model once per actor. An ONNX model needs onnxruntime,
PIL and numpy only in the workers (the normalisation is numpy): no torch import. Rows keep the input order.

Output (outputs.py puts it in place whole): ``key`` (the shard row's key or the file's path),
``top_k_index``, ``top_k_class``, ``top_k_probability`` (lists, most probable first), ``error`` (why the row
could not be predicted, else null) and, with labels, ``label`` and ``correct`` (top-1 == label). An image
that cannot be read or decoded is a row with an error; the others still run.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import time
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitlab.cluster import connect
from vitlab.data.manifest import MANIFEST, load_manifest
from vitlab.deploy import outputs
from vitlab.deploy.bundle import INPUT_NAME, OUTPUT_NAME, ModelBundle
from vitlab.deploy.onnx import ort_session
from vitlab.deploy.predict import IMAGE_SUFFIXES, list_images, read_error, runner, softmax
from vitlab.errors import UserError
from vitlab.train import storage

log = logging.getLogger(__name__)

SPLITS = ("val", "train")
COMPUTE = ("tasks", "actors")  # --compute: the default first
READ_CHUNK = 64  # image files per read task: blocks small enough to spread over the actors
BLOCK_ROWS = 128  # rows per block a shard read yields


def output_schema(labelled: bool) -> pa.Schema:
    fields = [("key", pa.string()), ("top_k_index", pa.list_(pa.int32())), ("top_k_class", pa.list_(pa.string())),
              ("top_k_probability", pa.list_(pa.float32())), ("error", pa.string())]
    if labelled:
        fields += [("label", pa.int64()), ("correct", pa.bool_())]
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def is_dataset(location: str) -> bool:
    return storage.exists(storage.join(location, MANIFEST))


def resolve_inputs(inputs: list[str], split: str) -> dict[str, Any]:
    """What DATA names: {"kind": "shards", "files", "rows", "classes"} for a prepared dataset, or {"kind":
    "images", "files"}. A path that does not exist, or a folder without images, is a UserError."""
    datasets = [p for p in inputs if is_dataset(p)]
    if datasets:
        if len(inputs) > 1:
            raise UserError(f"{datasets[0]}: a prepared dataset must be the only DATA (got {len(inputs)} inputs)")
        if split not in SPLITS:
            raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
        manifest = load_manifest(datasets[0])
        return {"kind": "shards", "files": manifest.files(split), "rows": manifest.rows(split),
                "classes": manifest.classes, "split": split}
    files: list[str] = []
    for p in inputs:
        if storage.is_uri(p):
            files += _list_uri(p)
        elif not storage.exists(p):
            raise UserError(f"{p}: no such file or directory (expected image files, folders of images or a "
                            "dataset made by 'vitlab data prepare')")
        else:
            files += [str(f) for f in list_images([p])]
    return {"kind": "images", "files": files, "rows": len(files)}


def _list_uri(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        return [uri]
    if kind == pafs.FileType.NotFound:
        raise UserError(f"{uri}: no such object or prefix (expected images or a dataset)")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rels = sorted(i.path[len(path):].lstrip("/") for i in infos
                  if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_SUFFIXES))
    if not rels:
        raise UserError(f"{uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return [storage.join(uri, r) for r in rels]


def read_shard_rows(batch: dict[str, np.ndarray], files: list[str]):
    """Shard indices -> blocks of {key, image, label, error}: the shard's own bytes, nothing decoded."""
    for idx in batch["shard"]:
        table = pq.read_table(files[int(idx)], columns=["key", "image", "label"])
        table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
        for start in range(0, table.num_rows, BLOCK_ROWS):
            yield table.slice(start, BLOCK_ROWS)


def read_image_files(batch: dict[str, np.ndarray]) -> pa.Table:
    """Paths -> {key, image, error}: each file's bytes, or why it cannot be read."""
    keys, images, errors = [], [], []
    for path in batch["path"]:
        keys.append(str(path))
        try:
            images.append(storage.read_bytes(str(path)))
            errors.append(None)
        except Exception as e:  # this file's problem: its row says so, the others still run
            images.append(b"")
            errors.append(read_error(e))
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                     "error": pa.array(errors, pa.string())})


# ---------------------------------------------------------------------------------------------------------
# The actors


_MODELS: dict[tuple, Model] = {}  # per worker process (tasks): the model of each run, loaded once


class Model:
    """The model of one run in one worker process: loaded once; ``predict`` decodes, runs and keeps the top-k
    of one batch. An ONNX payload needs onnxruntime, PIL and numpy only: no torch import in the worker."""

    def __init__(self, payload, top_k: int, threads: int):
        import ray

        bundle, kind, blob = ray.get(payload[1])  # the object store's one copy, fetched once per process
        if kind == "onnx":
            session = ort_session(blob, threads)
            self.run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        else:
            import torch

            if kind == "torchscript":
                model = torch.jit.load(io.BytesIO(blob))
            else:  # blob is not read from a file: this job's driver pickled its own model (actor_payload)
                model = pickle.loads(blob)  # safe: our driver's own object-store bytes, as Ray ships any object
            bundle = replace(bundle, model=model.eval())
            self.run = runner(bundle, threads)
        self.bundle = bundle
        self.k = min(top_k, bundle.num_classes)
        self.classes = np.asarray(bundle.classes, dtype=object)

    def predict(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        decoded, rows = [], []
        for i, data in enumerate(batch.column("image").to_pylist()):
            if errors[i] is not None:
                continue
            try:
                decoded.append(self.bundle.decode(data))
                rows.append(i)
            except Exception as e:  # any decoder failure is this image's problem
                errors[i] = read_error(e)
        n = batch.num_rows
        index: list[list[int]] = [[] for _ in range(n)]
        names: list[list[str]] = [[] for _ in range(n)]
        probs: list[list[float]] = [[] for _ in range(n)]
        if decoded:
            p = softmax(self.run(self.bundle.normalize(np.stack(decoded))).astype(np.float64))
            order = np.argsort(-p, axis=1, kind="stable")[:, :self.k]
            top = np.take_along_axis(p, order, axis=1).astype(np.float32)
            for j, i in enumerate(rows):
                index[i], names[i], probs[i] = order[j].tolist(), self.classes[order[j]].tolist(), top[j].tolist()
        labelled = "label" in batch.column_names
        cols: dict[str, Any] = {"key": batch.column("key"), "top_k_index": index, "top_k_class": names,
                                "top_k_probability": probs, "error": errors}
        if labelled:
            labels = batch.column("label").to_pylist()
            cols["label"] = labels
            cols["correct"] = [bool(index[i]) and index[i][0] == labels[i] for i in range(n)]
        return pa.table(cols, schema=output_schema(labelled))


class Predictor:
    """One per actor (the actor pool): the model, loaded once."""

    def __init__(self, payload, top_k: int, threads: int):
        self.model = Model(payload, top_k, threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.model.predict(batch)


def cached_model(payload, top_k: int, threads: int) -> Model:
    """This worker process's Model of the run (tasks): loaded by the first task of the run that lands here."""
    key = (payload[0], top_k, threads)
    if key not in _MODELS:
        _MODELS.clear()  # one run's model at a time
        _MODELS[key] = Model(payload, top_k, threads)
    return _MODELS[key]


def read_and_predict(batch: dict[str, np.ndarray], payload, top_k: int, threads: int, batch_size: int,
                     files: list[str] | None = None):
    """The task form (the default): one block of inputs (shard indices, or image paths) read, decoded and
    predicted in one task, in batches of ``batch_size``; one output block per block read."""
    model = cached_model(payload, top_k, threads)
    tables = read_shard_rows(batch, files or []) if "shard" in batch else [read_image_files(batch)]
    for table in tables:
        yield pa.concat_tables([model.predict(table.slice(i, batch_size))
                                for i in range(0, table.num_rows, batch_size)])


def actor_payload(bundle: ModelBundle) -> tuple[ModelBundle, str, bytes]:
    """What every actor gets (once, through the object store): the bundle without its model, and the model as
    bytes: an export's ONNX file (its path is on this machine only), or the torch model traced to TorchScript,
    which loads with torch alone (unpickling a timm module imports timm in every actor: seconds per actor on
    this machine; the traced model computes the same logits, bit for bit), else pickled."""
    if bundle.model is None:
        return replace(bundle, onnx_path=None), "onnx", storage.read_bytes(str(bundle.onnx_path))
    import torch

    light = replace(bundle, model=None)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            example = torch.zeros(2, 3, bundle.image_size, bundle.image_size)
            traced = torch.jit.trace(bundle.model.eval(), example, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        return light, "torchscript", buf.getvalue()
    except Exception as e:  # a model the tracer cannot take: the module itself
        log.info("TorchScript trace failed (%s); the actors unpickle the model", storage.first_line(e))
        return light, "pickle", pickle.dumps(bundle.model)


def pool_size(source: dict[str, Any], actors: int | None, threads: int, compute: str = "tasks") -> int:
    """--actors, else as many workers (tasks or actors) of ``threads`` CPUs as the cluster holds; never more
    than the input has blocks (a worker without a block would only cost its start)."""
    import ray

    if source["kind"] == "shards" and compute == "tasks":
        blocks = len(source["files"])  # a task reads a whole shard
    else:
        blocks = math.ceil(source["rows"] / (BLOCK_ROWS if source["kind"] == "shards" else READ_CHUNK))
    if actors is None:
        actors = int(ray.cluster_resources().get("CPU", 1) // threads)
    return max(1, min(actors, blocks))


# ---------------------------------------------------------------------------------------------------------
# The run


def batch_predict(bundle: ModelBundle, inputs: list[str], out: str, top_k: int = 5, batch_size: int = 32,
                  split: str = "val", actors: int | None = None, threads: int = 1,
                  overwrite: bool = False, compute: str = "tasks") -> dict[str, Any]:
    """Predict every row of DATA into PREDICTIONS; returns the summary (also in its _vitlab_predictions.json)."""
    for flag, v in (("top-k", top_k), ("batch-size", batch_size), ("threads", threads), ("actors", actors)):
        if v is not None and v < 1:
            raise UserError(f"--{flag} {v}: expected at least 1")
    if compute not in COMPUTE:
        raise UserError(f"--compute {compute}: expected one of {', '.join(COMPUTE)}")
    outputs.check_out(out, overwrite)
    start = time.perf_counter()  # the summary's seconds: from here to the output read back, less connect()
    source = resolve_inputs(inputs, split)
    if source["rows"] == 0:
        raise UserError(f"{inputs[0]}: the {split} split has no rows")
    import ray

    connecting = time.perf_counter()
    connect()  # a local Ray started here: its start is reported apart (ray_connect_s), not in seconds
    connect_s = time.perf_counter() - connecting
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_uri(out):
        raise UserError(f"--out {out}: a local path on a cluster of {len(nodes)} nodes (the actors write the "
                        "Parquet files on their own nodes); give an s3:// or gs:// URI")
    size = pool_size(source, actors, threads, compute)
    ds = predictions(bundle, source, top_k, batch_size, size, threads, compute)
    target = outputs.begin(out)
    try:
        if compute == "tasks":  # the same resources: Ray Data fuses the write into the predicting tasks
            ds.write_parquet(target.work, ray_remote_args={"num_cpus": threads}, concurrency=size)
        else:  # small files: no CPU held back from the actors, few writers (each a worker process to start)
            ds.write_parquet(target.work, ray_remote_args={"num_cpus": 0}, concurrency=io_tasks(size))
        files = outputs.written_files(target)
        summary = _summary(bundle, inputs, out, source, files, top_k, compute, size, threads,
                           time.perf_counter() - start - connect_s)
        summary["ray_connect_s"] = round(connect_s, 3)
        outputs.commit(target, summary, files)
    except BaseException:
        outputs.abort(target)
        raise
    return summary


def predictions(bundle: ModelBundle, source: dict[str, Any], top_k: int, batch_size: int, size: int,
                threads: int, compute: str = "tasks"):
    """The Ray Data dataset of the output rows: ``size`` tasks (or actors) of ``threads`` CPUs at a time."""
    import hashlib

    import ray

    light, kind, blob = actor_payload(bundle)
    payload = [hashlib.sha1(blob).hexdigest(), ray.put((light, kind, blob))]  # one copy in the object store
    ds = _dataset(source, size, read=compute == "actors")
    if compute == "tasks":
        files = source["files"] if source["kind"] == "shards" else None
        return ds.map_batches(read_and_predict, batch_size=None, batch_format="numpy", num_cpus=threads,
                              compute=ray.data.TaskPoolStrategy(size=size),
                              fn_kwargs={"payload": payload, "top_k": top_k, "threads": threads,
                                         "batch_size": batch_size, "files": files})
    return ds.map_batches(Predictor, batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=size), num_cpus=threads,
                          fn_constructor_args=(payload, top_k, threads))


def io_tasks(actors: int) -> int:
    """Read (and write) tasks at a time: I/O only, zero CPUs, one per four actors; each one more is a worker
    process to start, which costs as much as the reading itself on a small machine."""
    return max(1, math.ceil(actors / 4))


def _dataset(source: dict[str, Any], size: int, read: bool):
    """The inputs: shard indices (one block each) or image paths (READ_CHUNK a block); ``read``: then read by
    zero-CPU tasks (the actor form; the task form reads in its own tasks)."""
    import ray

    files = source["files"]
    if source["kind"] == "shards":
        ds = ray.data.from_items([{"shard": i} for i in range(len(files))], override_num_blocks=len(files))
        if read:
            ds = ds.map_batches(read_shard_rows, batch_size=1, num_cpus=0,
                                compute=ray.data.TaskPoolStrategy(size=io_tasks(size)), fn_kwargs={"files": files})
    else:
        ds = ray.data.from_items([{"path": f} for f in files],
                                 override_num_blocks=max(1, math.ceil(len(files) / READ_CHUNK)))
        if read:
            ds = ds.map_batches(read_image_files, batch_size=None, num_cpus=0,
                                compute=ray.data.TaskPoolStrategy(size=io_tasks(size)), batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # rows in input order
    return ds


def _summary(bundle: ModelBundle, inputs: list[str], out: str, source: dict[str, Any], files: list[str],
             top_k: int, compute: str, workers: int, threads: int, seconds: float) -> dict[str, Any]:
    """Counts read back from the written Parquet: every input row must be there, exactly once."""
    labelled = source["kind"] == "shards"
    columns = ["key", "error", "correct"] if labelled else ["key", "error"]
    fs = storage.filesystem(files[0])[0] if files else None
    tables = [pq.read_table(storage.filesystem(f)[1], columns=columns, filesystem=fs) for f in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
    rows = table.num_rows
    if rows != source["rows"]:
        raise RuntimeError(f"wrote {rows} rows for {source['rows']} inputs")
    errors = rows - table.column("error").null_count
    if errors == rows:
        first = table.filter(pc.is_valid(table.column("error"))).slice(0, 1).to_pylist()[0]
        raise UserError(f"no image could be read ({rows} given; {first['key']}: {first['error']})")
    report: dict[str, Any] = {
        "model": bundle.source, "data": inputs, "out": out, "kind": source["kind"], "rows": rows,
        "predicted": rows - errors, "errors": errors, "top_k": min(top_k, bundle.num_classes),
        "runtime": "torch" if bundle.model is not None else "onnxruntime", "compute": compute,
        "workers": workers, "threads_per_worker": threads, "seconds": round(seconds, 3),
        "images_per_s": round(rows / max(seconds, 1e-9), 1),
    }
    if labelled:
        correct = int(pc.sum(table.column("correct")).as_py() or 0)
        labelled_rows = rows - errors
        report.update(split=source["split"], labelled=labelled_rows, correct=correct,
                      top1=correct / labelled_rows if labelled_rows else None)
    return report


def format_summary(report: dict[str, Any]) -> str:
    head = (f"{report['rows']} rows -> {report['out']} ({report['predicted']} predicted"
            + (f", {report['errors']} unreadable" if report["errors"] else "")
            + f"; top-{report['top_k']}, {report['runtime']}, {report['workers']} {report['compute']} x "
            f"{report['threads_per_worker']} threads, {report['images_per_s']:.0f} img/s)")
    if report.get("top1") is None:
        return head
    return (f"{head}\ntop-1 {report['top1']:.4f} ({report['correct']}/{report['labelled']} of the "
            f"{report['split']} split)")
