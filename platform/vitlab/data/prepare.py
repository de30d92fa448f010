"""Sources -> Parquet shards + manifest.json, as a Ray Data job.

The driver only lists the source (paths and labels) and cuts it into shards; each shard is one row of a Ray
Data dataset, and one Ray task per shard reads its files, validates them (decodes fully, so truncated files
are caught), converts or re-encodes where needed and writes one Parquet file (temp name, then rename). The
tasks return only small summaries (rows, sha256, rejects), from which the driver writes the manifest last.

On a local disk the whole output is built in a hidden sibling directory and swapped into place at the end
(vitlab.outdir), so an interrupted prepare never leaves a directory that looks finished, and --overwrite
replaces only a dataset vitlab wrote. On object stores (s3://), where there is no rename, the manifest is
written last and is the mark of a finished prepare.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from vitlab import __version__, outdir
from vitlab.cluster import connect
from vitlab.data import publish
from vitlab.data.manifest import MANIFEST, MANIFEST_VERSION, load_manifest
from vitlab.data.sources import SPLITS, Item, Listing, list_source
from vitlab.data.transforms import READ_FORMATS, open_image
from vitlab.errors import UserError
from vitlab.progress import Ticker, duration, eta
from vitlab.redact import redact
from vitlab.train import storage

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0  # a progress line (files done, files/s, rejects, ETA) this often, and at the end
DEFAULT_QUALITY = 95  # for images that must be converted (CMYK, grayscale, PNG) when --quality is not given
SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("key", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored. Without max_side/quality, valid RGB JPEGs are copied byte for byte."""

    max_side: int | None = None
    quality: int | None = None

    def target_quality(self) -> int:
        return self.quality or DEFAULT_QUALITY


class Rejected(Exception):
    """An input file that is not kept; the message is the reason recorded in the manifest."""


def encode_image(data: bytes, opts: EncodeOptions) -> tuple[bytes, int, int, str]:
    """Validate image bytes and return (jpeg, height, width, action) with action 'copied', 'converted'
    or 'reencoded'. Raises Rejected for empty, truncated, corrupt and non-image inputs."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        img = open_image(data)
        fmt = img.format
        img.load()  # a full decode: truncated files fail here, not in training
    except UnidentifiedImageError:
        raise Rejected(f"not an image (expected one of {', '.join(READ_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # a tiny file that declares billions of pixels
        raise Rejected(f"decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's reject, never the whole prepare's
        raise Rejected(f"truncated or corrupt image ({type(e).__name__}: {e})") from None
    too_big = opts.max_side is not None and max(img.size) > opts.max_side
    if fmt == "JPEG" and img.mode == "RGB" and not too_big and opts.quality is None:
        return data, img.height, img.width, "copied"
    action = "reencoded" if fmt == "JPEG" and img.mode == "RGB" else "converted"
    return (*_to_jpeg(img, opts, too_big), action)


def encode_pixels(pixels: bytes, shape: tuple[int, int], opts: EncodeOptions) -> tuple[bytes, int, int, str]:
    """Encode raw HxWx3 uint8 pixels (CIFAR, digits) as JPEG."""
    arr = np.frombuffer(pixels, dtype=np.uint8).reshape(shape[0], shape[1], 3)
    img = Image.fromarray(arr, "RGB")
    too_big = opts.max_side is not None and max(img.size) > opts.max_side
    return (*_to_jpeg(img, opts, too_big), "encoded")


def _to_jpeg(img: Image.Image, opts: EncodeOptions, shrink: bool) -> tuple[bytes, int, int]:
    if img.mode != "RGB":
        # CMYK / grayscale / palette / alpha -> RGB (alpha composited on white, as a viewer shows it)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        else:
            img = img.convert("RGB")
    if shrink:
        assert opts.max_side is not None
        s = opts.max_side / max(img.size)
        size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
        img = img.resize(size, Image.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=opts.target_quality())
    return buf.getvalue(), img.height, img.width


def write_shard(chunk: dict[str, Any], out_uri: str, opts: EncodeOptions) -> dict[str, Any]:
    """Ray task body: one chunk of items -> one Parquet shard. Returns the shard's summary row."""
    # File items are '<source>/<key>': the source's filesystem is opened once per task, and keys are appended
    # to its path as they are, so names that are not valid in a URI still read.
    source_fs, source_root = storage.filesystem(chunk["source"]) if chunk["source"] else (None, "")
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    rejects, actions = [], {}
    pixels = chunk["pixels"]
    for i, key in enumerate(chunk["keys"]):
        try:
            if pixels is not None and pixels[i] is not None:
                shape = (int(chunk["heights"][i]), int(chunk["widths"][i]))
                data, h, w, action = encode_pixels(pixels[i], shape, opts)
            else:
                with source_fs.open_input_file(f"{source_root}/{key}") as f:
                    data, h, w, action = encode_image(f.read(), opts)
        except Rejected as e:
            rejects.append({"path": str(key), "split": chunk["split"], "reason": str(e)})
            continue
        except OSError as e:
            rejects.append({"path": str(key), "split": chunk["split"], "reason": f"unreadable ({e})"})
            continue
        actions[action] = actions.get(action, 0) + 1
        rows["image"].append(data)
        rows["label"].append(int(chunk["labels"][i]))
        rows["key"].append(str(key))
        rows["height"].append(h)
        rows["width"].append(w)
    summary = {"split": chunk["split"], "file": "", "rows": 0, "sha256": "", "bytes": 0, "files": len(chunk["keys"]),
               "rejects": json.dumps(rejects), "actions": json.dumps(actions)}
    if not rows["key"]:
        return summary
    sink = pa.BufferOutputStream()
    # JPEG bytes do not compress; skipping compression saves CPU on every read.
    pq.write_table(pa.table(rows, schema=SCHEMA), sink, compression="none", row_group_size=1024)
    buf = sink.getvalue()
    rel = f"{chunk['split']}/{chunk['shard']}.parquet"
    storage.write_bytes(storage.join(out_uri, rel), buf)
    summary.update(file=rel, rows=len(rows["key"]), sha256=hashlib.sha256(buf).hexdigest(), bytes=buf.size)
    return summary


def plan_shards(listing: Listing, shard_rows: int, seed: int) -> list[dict[str, Any]]:
    """Cut each split into chunks of about ``shard_rows`` items. Train items are shuffled first (seeded):
    class-folder listings are sorted by class, and a shard holding one class would make class-pure
    batches however the shards are read."""
    chunks = []
    for split in SPLITS:
        items = [it for it in listing.items if it.split == split]
        if split == "train":
            items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
        n_shards = max(1, -(-len(items) // shard_rows)) if items else 0
        for s, part in enumerate(np.array_split(np.arange(len(items)), n_shards) if n_shards else []):
            shard = f"{split}-{s:05d}-of-{n_shards:05d}"
            chunks.append(_chunk(split, shard, [items[i] for i in part], listing.root))
    return chunks


def _chunk(split: str, shard: str, items: list[Item], source: str | None) -> dict[str, Any]:
    in_memory = any(it.pixels is not None for it in items)
    return {
        "split": split,
        "shard": shard,
        "source": source,  # file items are <source>/<key>
        "keys": [it.key for it in items],
        "labels": [it.label for it in items],
        "pixels": [it.pixels for it in items] if in_memory else None,
        "heights": [it.shape[0] if it.shape else 0 for it in items],
        "widths": [it.shape[1] if it.shape else 0 for it in items],
    }


def default_shard_rows(n_items: int, shard_rows: int | None) -> int:
    """Explicit --shard-rows wins; otherwise 1024 rows (about 100 MB of ImageNet JPEGs), but at least 8
    shards per split on small datasets so several workers and decode tasks have something to share."""
    if shard_rows:
        return shard_rows
    return max(32, min(1024, -(-n_items // 16)))


def _check_out(source: str, out: str, overwrite: bool) -> None:
    """OUT may be new, or with --overwrite a dataset vitlab wrote (it holds a vitlab manifest) that is not
    SOURCE and does not contain it: nothing else is ever replaced."""
    if storage.is_uri(out):
        if storage.exists(storage.join(out, MANIFEST)):
            if not overwrite:
                raise UserError(f"{out}: output already exists (pass --overwrite to replace it)")
            load_manifest(out)  # a dataset vitlab wrote, else one line naming what is wrong with it
        return
    final = Path(out).resolve()
    outdir.recover(final)
    if not final.exists():
        return
    if not overwrite:
        raise UserError(f"{out}: output already exists (pass --overwrite to replace it)")
    try:
        load_manifest(str(final))
    except UserError as e:
        raise UserError(f"{out}: --overwrite refused: not a dataset vitlab prepared ({e}); choose a new --out "
                        "or remove it yourself") from None
    if source != "digits" and not storage.is_uri(source):
        src = Path(source).resolve()
        if src == final or final in src.parents:
            raise UserError(f"{out}: --overwrite refused: it is or contains SOURCE {source}")


def prepare(
    source: str,
    out: str,
    fmt: str | None = None,
    val_fraction: float | None = None,
    opts: EncodeOptions = EncodeOptions(),
    shard_rows: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the prepare job and return the manifest. Errors in the inputs raise UserError before Ray starts."""
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: expected a fraction in [0, 1)")
    _check_out(source, out, overwrite)
    listing = list_source(source, fmt, val_fraction, seed)
    if not listing.items:
        raise UserError(f"{source}: no image files found")
    start = time.perf_counter()
    rows = default_shard_rows(len(listing.items), shard_rows)
    chunks = plan_shards(listing, rows, seed)
    log.info("%s: %d files in %d shards, %d classes", source, len(listing.items), len(chunks), len(listing.classes))

    if storage.is_uri(out):  # object storage: a new version prefix, then the manifest (data/publish.py)
        final_dir, final_uri, version = None, out.rstrip("/"), publish.new_version()
        work_uri, replaced = storage.join(final_uri, version), publish.listed_files(final_uri)
    else:  # a local directory: a staging sibling, swapped in whole (outdir.py)
        final_dir, version = Path(out).resolve(), ""
        final_uri = work_uri = str(outdir.staging(final_dir))
    try:
        summaries = _run_shard_tasks(chunks, work_uri, opts)
        if version:
            summaries = publish.under(version, summaries)
        manifest = _manifest(source, listing, summaries, opts, rows, seed, time.perf_counter() - start)
        _write_manifest(final_uri, manifest)
        if final_dir is not None:
            outdir.swap(Path(work_uri), final_dir)
    except BaseException:
        if final_dir is not None:
            shutil.rmtree(work_uri, ignore_errors=True)
        else:
            publish.discard(work_uri)
        raise
    if version:
        publish.retire(final_uri, replaced, keep=version)
    return manifest


def _run_shard_tasks(chunks: list[dict[str, Any]], work_uri: str, opts: EncodeOptions) -> list[dict[str, Any]]:
    import ray

    connect()
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    # One task per shard; read, validate and write are fused in it, so nothing but summaries moves.
    ds = ds.map(write_shard, fn_kwargs={"out_uri": work_uri, "opts": opts}, num_cpus=1)
    total = sum(len(c["keys"]) for c in chunks)
    ticker, start = Ticker(PROGRESS_EVERY_S), time.perf_counter()
    summaries, files, rejects = [], 0, 0
    for summary in ds.iter_rows():  # as shards finish, in any order
        summaries.append(summary)
        files += summary["files"]
        rejects += len(json.loads(summary["rejects"]))
        if ticker.due() or files == total:
            elapsed = time.perf_counter() - start
            log.info("prepare: %d/%d files (%.0f%%), %.0f files/s, %d rejected, ETA %s", files, total,
                     100 * files / max(1, total), files / max(1e-9, elapsed), rejects,
                     duration(eta(files, total, elapsed)))
    return summaries


def _manifest(source: str, listing: Listing, summaries: list[dict[str, Any]], opts: EncodeOptions,
              shard_rows: int, seed: int, seconds: float) -> dict[str, Any]:
    splits: dict[str, Any] = {s: {"rows": 0, "shards": []} for s in SPLITS}
    rejects = list(listing.rejects)
    actions: dict[str, int] = {}
    for s in sorted(summaries, key=lambda r: r["file"]):
        rejects.extend(json.loads(s["rejects"]))
        for k, v in json.loads(s["actions"]).items():
            actions[k] = actions.get(k, 0) + v
        if s["rows"]:
            splits[s["split"]]["rows"] += s["rows"]
            splits[s["split"]]["shards"].append(
                {"file": s["file"], "rows": s["rows"], "sha256": s["sha256"], "bytes": s["bytes"]}
            )
    counts = [0] * len(listing.classes)
    for it in listing.items:
        counts[it.label] += it.split == "train"
    return {
        "version": MANIFEST_VERSION,
        "vitlab_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source if source == "digits" else redact(storage.absolute(source)),
        "format": listing.format,
        "num_classes": len(listing.classes),
        "classes": listing.classes,
        "wnids": listing.wnids,
        "splits": splits,
        "rejects": sorted(rejects, key=lambda r: (r["split"], r["path"])),
        "encoding": {**asdict(opts), "default_quality": DEFAULT_QUALITY, "format": "JPEG", **actions},
        "shard_rows": shard_rows,
        "seed": seed,
        "prepare_s": round(seconds, 2),
        "columns": {f.name: str(f.type) for f in SCHEMA},
    }


def _write_manifest(work_uri: str, manifest: dict[str, Any]) -> None:
    storage.write_text(storage.join(work_uri, MANIFEST), json.dumps(manifest, indent=2))


def summary_line(out: str, manifest: dict[str, Any]) -> str:
    rejected = {s: sum(r["split"] == s for r in manifest["rejects"]) for s in SPLITS}
    parts = [
        f"{s} {manifest['splits'][s]['rows']} kept / {rejected[s]} rejected "
        f"({len(manifest['splits'][s]['shards'])} shards)"
        for s in SPLITS
    ]
    return (f"prepared {manifest['format']} -> {out}: {manifest['num_classes']} classes; "
            + "; ".join(parts) + f"; {manifest['prepare_s']:.1f}s")
