"""`vitlab bench predict`: batch prediction on Ray Data (`vitlab predict --out`) against the single-process
`vitlab predict`, on the same image files, the same model and the same runtime (torch, or with --runtime
onnxruntime an export directory written first), in one invocation.

What each clock covers (also in the JSON's "clocks"): the single-process side is ``predict()`` from the call to
its report (listing, the model's session or threads, read, val decode, inference, top-k), in a process where
the model is already loaded (as after `vitlab predict` has loaded MODEL). The Ray Data side is
``batch_predict()`` from the call to the published, read-back output, on a Ray started (or connected to) just
before, every round, so that its worker processes are as fresh as in one `vitlab predict --out` call: their
imports, the model's load in each, the reads, decode, inference and the Parquet write are all in its time.
Starting the local Ray (``connect()``) is timed apart (``ray_start_s``) and also given with the Ray Data time
(``ratio_with_ray_start``): a user with a running cluster (RAY_ADDRESS) does not pay it. The steady rate is
measured apart, on a second run streamed to this process: rows after the first output block over the time
after it. Sides alternate over the rounds, so a change in the machine's load touches both.
"""

from __future__ import annotations

import io
import itertools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vitlab.bench.common import QUICK_MODEL, check_positive, cores, load_avg
from vitlab.cluster import connect
from vitlab.deploy.batch import batch_predict, pool_size, predictions, resolve_inputs
from vitlab.deploy.bundle import ModelBundle, load_bundle
from vitlab.deploy.onnx import export
from vitlab.deploy.predict import list_images, predict
from vitlab.errors import UserError
from vitlab.model import check_model_name, create_model, with_img_size

# The default model: jobs/digits_vit.yaml's ViT (a model whose per-image cost is of the order of the decode's)
DIGITS_MODEL = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4,
                                         "num_heads": 3, "mlp_ratio": 2.0})
RUNTIMES = ("torch", "onnxruntime")
CLOCKS = {"single_process": "predict() call to report: list, session/threads, read, decode, infer, top-k",
          "ray_data": "batch_predict() call to the published output read back, on fresh worker processes: "
                      "listing, the model to the object store, worker imports and model loads, read, decode, "
                      "infer, Parquet write",
          "ray_start": "connect(): a local Ray started (or a running cluster joined), not in ray_data"}
DISTINCT = 50  # synthetic images drawn; the files cycle through them (the decode cost is per file)


def _images(out: Path, n: int, source: str | None, size: tuple[int, int]) -> list[bytes]:
    """``n`` JPEG files under ``out``: the source folder's images cycled, or synthetic ones."""
    if source:
        pool = [f.read_bytes() for f in list_images([source])[:DISTINCT]]
    else:
        from vitlab.data.synth import synth_image

        pool = []
        for i in range(min(n, DISTINCT)):
            buf = io.BytesIO()
            synth_image(i % 10, i, *size).save(buf, "JPEG", quality=90)
            pool.append(buf.getvalue())
    out.mkdir(parents=True)
    for i, data in zip(range(n), itertools.cycle(pool)):
        (out / f"{i:05d}.jpg").write_bytes(data)
    return pool


def _bundle(model_name: str | None, image_size: int, quick: bool) -> tuple[ModelBundle, dict[str, Any]]:
    import torch

    if quick:
        name, kwargs = QUICK_MODEL
    elif model_name:
        check_model_name(model_name)
        name, kwargs = model_name, with_img_size(model_name, {}, image_size)
    else:
        name, kwargs = DIGITS_MODEL[0], {**DIGITS_MODEL[1], "img_size": image_size}
    torch.manual_seed(0)
    try:
        model = create_model(name, 10, kwargs).eval()
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"--model {name}: timm cannot build it with {kwargs}: {e}") from None
    size = kwargs.get("img_size", image_size)
    bundle = ModelBundle(source=f"{name} (random weights)", classes=[str(i) for i in range(10)], image_size=size,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875, model_name=name,
                         model_kwargs=kwargs, model=model)
    return bundle, {"model": name, "model_kwargs": kwargs, "image_size": size}


def bench_predict(source: str | None = None, images: int | None = None, model_name: str | None = None,
                  image_size: int = 32, batch_size: int = 32, quick: bool = False, rounds: int | None = None,
                  runtime: str = "torch", compute: str = "tasks") -> dict[str, Any]:
    """Run both sides (JSON keys in docs/benchmarks.md)."""
    import ray
    import torch

    check_positive(images=images, image_size=image_size, batch_size=batch_size)
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    n = images or (48 if quick else 1000)
    rounds = rounds or (1 if quick else 2)
    file_size = (64, 48) if quick else (500, 375)
    bundle, settings = _bundle(model_name, image_size, quick)
    threads = cores()
    torch.set_num_threads(threads)
    load_before = load_avg()
    work = Path(tempfile.mkdtemp(prefix="vitlab-bench-predict-"))
    try:
        if runtime == "onnxruntime":  # the export directory is MODEL on both sides
            export(bundle, work / "export", log_to_mlflow=False)
            bundle = load_bundle(str(work / "export"))
        pool = _images(work / "images", n, source, file_size)
        files = sorted(str(f) for f in (work / "images").iterdir())
        predict(bundle, files[:batch_size], batch_size=batch_size)  # warm-up: first-call costs of torch
        single, ray_full, ray_start, steady, start, summary = [], [], [], [], [], {}
        for r in range(rounds):
            t0 = time.perf_counter()
            report = predict(bundle, [str(work / "images")], batch_size=batch_size)
            single.append(time.perf_counter() - t0)
            ray.shutdown()  # a fresh Ray (or job) each round: worker processes as fresh as in one CLI call
            t0 = time.perf_counter()
            connect()
            ray_start.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = batch_predict(bundle, [str(work / "images")], str(work / f"out{r}"), batch_size=batch_size,
                                    compute=compute)
            ray_full.append(time.perf_counter() - t0)
            first_s, rows_after, after_s = _stream(bundle, str(work / "images"), batch_size, compute)
            start.append(first_s)
            steady.append((rows_after, after_s))
        agreement = _agreement(report, work / f"out{rounds - 1}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single_rate = n * rounds / sum(single)
    ray_rate = n * rounds / sum(ray_full)
    with_start = n * rounds / (sum(ray_full) + sum(ray_start))
    after_rows, after_s = sum(r for r, _ in steady), sum(t for _, t in steady)
    steady_rate = after_rows / after_s if after_rows and after_s > 0 else None
    return {
        "single_process_images_per_s": round(single_rate, 1),
        "ray_data_images_per_s": round(ray_rate, 1),
        "ratio": round(ray_rate / single_rate, 3),
        "ray_start_s": round(sum(ray_start) / rounds, 2),
        "ratio_with_ray_start": round(with_start / single_rate, 3),
        "ray_data_pool_start_s": round(sum(start) / rounds, 2),
        "ray_data_steady_images_per_s": round(steady_rate, 1) if steady_rate else None,
        "steady_ratio": round(steady_rate / single_rate, 3) if steady_rate else None,
        "top1_agreement": agreement,
        "clocks": CLOCKS,
        "seconds": {"single_process": [round(s, 2) for s in single], "ray_data": [round(s, 2) for s in ray_full],
                    "ray_start": [round(s, 2) for s in ray_start],
                    "ray_data_to_first_batch": [round(s, 2) for s in start],
                    "ray_data_after_first_batch": [round(t, 2) for _, t in steady]},
        "settings": {
            **settings, "images": n, "distinct_images": len(pool), "source": source or "synthetic JPEGs (q90)",
            "file_size": None if source else f"{file_size[0]}x{file_size[1]}", "batch_size": batch_size,
            "rounds": rounds, "runtime": runtime, "single_process_threads": threads, "compute": compute,
            "workers": summary.get("workers"), "threads_per_worker": summary.get("threads_per_worker", 1),
            "torch": torch.__version__, "quick": quick, "weights": "random (timm, pretrained=False)",
            "cores": cores(), "load_avg_1m": [load_before, load_avg()],
        },
    }


def _stream(bundle: ModelBundle, images: str, batch_size: int, compute: str) -> tuple[float, int, float]:
    """The Ray Data pipeline of ``batch_predict`` streamed here: (seconds to the first output batch, rows after
    it, seconds after it)."""
    source = resolve_inputs([images], "val")
    t0 = time.perf_counter()
    ds = predictions(bundle, source, 5, batch_size, pool_size(source, None, 1, compute), 1, compute)
    first, rows = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first = time.perf_counter()
        else:
            rows += batch.num_rows
    end = time.perf_counter()
    return (first or end) - t0, rows, end - (first or end)


def _agreement(report: dict[str, Any], out: Path) -> float:
    """Share of images where both sides name the same top-1 class."""
    table = pq.read_table(out, columns=["key", "top_k_index"]).to_pydict()
    ray_top1 = {k: v[0] for k, v in zip(table["key"], table["top_k_index"], strict=True) if v}
    single = {r["path"]: r["top_k"][0]["index"] for r in report["results"] if "top_k" in r}
    same = sum(ray_top1.get(p) == c for p, c in single.items())
    return round(same / max(1, len(single)), 4)


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"{s['images']} images ({s['source']}{', ' + s['file_size'] if s['file_size'] else ''}), "
             f"{s['model']} {s['image_size']}px, {s['runtime']}, batch {s['batch_size']}, {s['rounds']} rounds, "
             f"{s['cores']} cores",
             f"{'side':<44}{'img/s':>9}{'ratio':>9}",
             f"{'single-process predict (' + str(s['single_process_threads']) + ' threads)':<44}"
             f"{report['single_process_images_per_s']:>9.1f}{'1.00x':>9}",
             f"{'Ray Data predict --out (' + str(s['workers']) + ' ' + s['compute'] + ' x 1)':<44}"
             f"{report['ray_data_images_per_s']:>9.1f}{report['ratio']:>8.2f}x"]
    if report["ray_data_steady_images_per_s"]:
        lines.append(f"{'  its pool once started (start ' + str(report['ray_data_pool_start_s']) + ' s)':<44}"
                     f"{report['ray_data_steady_images_per_s']:>9.1f}{report['steady_ratio']:>8.2f}x")
    lines.append(f"{'  with the local Ray start (' + str(report['ray_start_s']) + ' s)':<44}"
                 f"{'':>9}{report['ratio_with_ray_start']:>8.2f}x")
    lines.append(f"top-1 agreement of the two sides: {report['top1_agreement']:.2%}")
    return "\n".join(lines)
