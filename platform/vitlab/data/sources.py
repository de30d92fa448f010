"""One reader per source layout. Each lists a source into class names and items (key, label, split, and
either a file to read or the raw pixels of an in-memory image); reading and validating the bytes happens
later, in the prepare job's Ray tasks, so listing stays cheap even for ImageNet's 1.3M files.

Class indices follow torchvision's ``ImageFolder``: sorted folder names.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitlab.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class Item:
    split: str
    key: str
    label: int
    path: str | None = None  # a file to read and validate
    pixels: bytes | None = None  # raw HxWx3 uint8 for in-memory sources (CIFAR, digits)
    shape: tuple[int, int] | None = None  # (height, width) of ``pixels``


@dataclass
class Listing:
    format: str
    classes: list[str]
    wnids: list[str] | None = None
    items: list[Item] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # found while listing (e.g. unlabeled files)


def _class_dirs(root: Path) -> list[str]:
    """Exactly torchvision.datasets.folder.find_classes: sorted names of the sub-directories."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _class_folder_items(root: Path, classes: list[str], split: str, source: Path) -> list[Item]:
    items = []
    for label, name in enumerate(classes):
        for f in _files_under(root / name):
            items.append(Item(split, str(f.relative_to(source)), label, path=str(f)))
    return items


def _split_val_fraction(items: list[Item], fraction: float, seed: int) -> list[Item]:
    """Move a seeded, per-class fraction of the items to 'val' (stratified, so every class is in both)."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    for group in by_label.values():
        n_val = int(round(len(group) * fraction))
        if fraction > 0 and n_val == 0 and len(group) > 1:
            n_val = 1
        for i in rng.permutation(len(group))[:n_val]:
            group[i].split = "val"
    return items


def _find_file(names: tuple[str, ...], *dirs: Path) -> Path | None:
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _synset_names(source: Path, wnids: list[str]) -> list[str]:
    """Readable names from ImageNet's LOC_synset_mapping.txt when present, else the wnids themselves."""
    mapping_file = _find_file(("LOC_synset_mapping.txt", "synset_words.txt"), source, *source.parents[:3])
    if not mapping_file:
        return list(wnids)
    names = {}
    for line in mapping_file.read_text().splitlines():
        wnid, _, words = line.partition(" ")
        names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def read_class_folders(source: Path, val_fraction: float, seed: int) -> Listing:
    """ImageNet's layout (train/<class>/, val/<class>/ or a flat val/ + LOC_val_solution.csv), or plain
    class folders split by ``val_fraction``."""
    train_dir = source / "train"
    if not train_dir.is_dir():
        classes = _class_dirs(source)
        if not classes:
            raise UserError(f"{source}: no class folders found (expected SOURCE/<class>/* or SOURCE/train/<class>/*)")
        items = _class_folder_items(source, classes, "train", source)
        return Listing("folders", classes, items=_split_val_fraction(items, val_fraction, seed))

    classes = _class_dirs(train_dir)
    if not classes:
        raise UserError(f"{train_dir}: no class folders found (expected train/<class>/*)")
    is_wnid = all(c.startswith("n") and c[1:].isdigit() for c in classes)
    listing = Listing(
        "imagenet" if is_wnid else "folders",
        _synset_names(source, classes) if is_wnid else classes,
        wnids=classes if is_wnid else None,
        items=_class_folder_items(train_dir, classes, "train", source),
    )
    val_dir = source / "val"
    if not val_dir.is_dir():
        _split_val_fraction(listing.items, val_fraction, seed)
    elif any(e.is_dir() for e in os.scandir(val_dir)):
        val_classes = _class_dirs(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{val_dir}: class folders not in train/: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        for name in val_classes:
            for f in _files_under(val_dir / name):
                listing.items.append(Item("val", str(f.relative_to(source)), index[name], path=str(f)))
    else:
        listing.items.extend(_flat_imagenet_val(source, val_dir, classes, listing))
    return listing


def _flat_imagenet_val(source: Path, val_dir: Path, classes: list[str], listing: Listing) -> list[Item]:
    """ImageNet's flat validation folder, labelled by LOC_val_solution.csv (ImageId, PredictionString)."""
    solution = _find_file(("LOC_val_solution.csv",), source, val_dir, *source.parents[:3])
    if solution is None:
        raise UserError(
            f"{val_dir}: flat validation folder without labels (expected LOC_val_solution.csv in {source})"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    with solution.open(newline="") as f:
        for row in csv.DictReader(f):
            wnid = row["PredictionString"].split()[0]
            if wnid not in index:
                raise UserError(f"{solution}: image {row['ImageId']} has class {wnid}, not in train/")
            labels[row["ImageId"]] = index[wnid]
    items = []
    for f in _files_under(val_dir):
        label = labels.get(f.stem)
        key = str(f.relative_to(source))
        if label is None:
            listing.rejects.append({"path": key, "split": "val", "reason": f"no label in {solution.name}"})
            continue
        items.append(Item("val", key, label, path=str(f)))
    return items


def read_tiny_imagenet(source: Path, val_fraction: float, seed: int) -> Listing:
    """Tiny ImageNet: wnids.txt, words.txt, train/<wnid>/images/*, val/images/* + val/val_annotations.txt."""
    wnids = sorted(w.strip() for w in (source / "wnids.txt").read_text().split() if w.strip())
    words: dict[str, str] = {}
    words_file = source / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    listing = Listing("tiny_imagenet", [words.get(w, w) for w in wnids], wnids=wnids)
    index = {w: i for i, w in enumerate(wnids)}
    for wnid in wnids:
        images = source / "train" / wnid / "images"
        for f in _files_under(images if images.is_dir() else source / "train" / wnid):
            if f.name.endswith("_boxes.txt"):
                continue  # bounding boxes, part of the layout, not an image
            listing.items.append(Item("train", str(f.relative_to(source)), index[wnid], path=str(f)))
    annotations = source / "val" / "val_annotations.txt"
    if annotations.is_file():
        labels = {}
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                labels[parts[0]] = parts[1]
        for f in _files_under(source / "val" / "images"):
            key = str(f.relative_to(source))
            wnid = labels.get(f.name)
            if wnid not in index:
                listing.rejects.append({"path": key, "split": "val", "reason": "no label in val_annotations.txt"})
                continue
            listing.items.append(Item("val", key, index[wnid], path=str(f)))
    else:
        _split_val_fraction(listing.items, val_fraction, seed)
    return listing


def read_cifar100(source: Path, val_fraction: float, seed: int) -> Listing:
    """CIFAR-100's python pickles (train, test, meta); fine labels; 'test' becomes the val split."""

    def unpickle(name: str) -> dict:
        with (source / name).open("rb") as f:
            return pickle.load(f, encoding="latin1")

    meta = unpickle("meta")
    listing = Listing("cifar100", list(meta["fine_label_names"]))
    for split, name in (("train", "train"), ("val", "test")):
        batch = unpickle(name)
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i, (pixels, label) in enumerate(zip(data, batch["fine_labels"], strict=True)):
            filename = batch["filenames"][i] if "filenames" in batch else f"{i:05d}.png"
            listing.items.append(
                Item(split, f"{name}/{filename}", int(label), pixels=pixels.tobytes(), shape=(32, 32))
            )
    return listing


DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SEED = 0


def read_digits(source: Path | None = None, val_fraction: float = DIGITS_VAL_FRACTION, seed: int = 0) -> Listing:
    """scikit-learn's 1,797 8x8 digits, upscaled to 32x32 RGB; a fixed, seeded, stratified 80/20 split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, _ = train_test_split(
        idx, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SEED, stratify=digits.target
    )
    train_set = set(train_idx.tolist())
    listing = Listing("digits", [str(d) for d in digits.target_names])
    for i in idx:
        gray = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = Image.fromarray(gray).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR).convert("RGB")
        split = "train" if i in train_set else "val"
        listing.items.append(
            Item(split, f"digits/{i:04d}", int(digits.target[i]), pixels=big.tobytes(), shape=big.size[::-1])
        )
    return listing


Reader = Callable[[Path, float, int], Listing]
READERS: dict[str, Reader] = {
    "digits": read_digits,
    "imagenet": read_class_folders,
    "folders": read_class_folders,
    "tiny_imagenet": read_tiny_imagenet,
    "cifar100": read_cifar100,
}


def detect_format(source: Path) -> str:
    """Name the layout of ``source`` from the files that define it."""
    if (source / "meta").is_file() and (source / "train").is_file() and (source / "test").is_file():
        return "cifar100"
    if (source / "wnids.txt").is_file():
        return "tiny_imagenet"
    if source.is_dir() and any(e.is_dir() for e in os.scandir(source)):
        return "folders"
    raise UserError(
        f"{source}: unrecognised source layout (expected class folders, train/<class>/, Tiny ImageNet's "
        "wnids.txt, or CIFAR-100's train/test/meta pickles); name one with --format"
    )


def list_source(source: str, fmt: str | None, val_fraction: float, seed: int) -> Listing:
    """Resolve SOURCE (a path or 'digits') and list it with the reader for its format."""
    if source == "digits" or fmt == "digits":
        return read_digits()
    if fmt is not None and fmt not in READERS:
        raise UserError(f"--format {fmt}: unknown format; expected one of {', '.join(READERS)}")
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: source not found (expected a directory or the word 'digits')")
    if not path.is_dir():
        raise UserError(f"{source}: not a directory (expected a dataset folder or the word 'digits')")
    fmt = fmt or detect_format(path)
    log.info("listing %s as %s", source, fmt)
    try:
        return READERS[fmt](path, val_fraction, seed)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename}: missing for format {fmt}") from None
