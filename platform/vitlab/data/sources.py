"""One reader per source layout (READERS). Each lists a source into class names and items (key, label, split,
raw pixels for in-memory sources); the prepare job's tasks read and validate the bytes, at ``<source>/<key>``.

Every source is listed through one ``Tree`` over a pyarrow filesystem (``LocalFileSystem`` for a local path,
the URI's own for s3://, gs://, file://): every layout reads the same from a disk and from object storage.
Class indices follow torchvision's ``ImageFolder``: sorted folder names.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow.fs as pafs

from vitlab.errors import UserError
from vitlab.names import check_name
from vitlab.train import storage

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.1  # held out per class when a source has no val split of its own
DIGITS_VAL_FRACTION = 0.2


@dataclass
class Item:
    split: str
    key: str  # the path under the source root ('/'-joined); for in-memory sources a name
    label: int
    pixels: bytes | None = None  # raw HxWx3 uint8 for in-memory sources (CIFAR, digits)
    shape: tuple[int, int] | None = None  # (height, width) of ``pixels``


@dataclass
class Listing:
    format: str
    classes: list[str]
    wnids: list[str] | None = None
    items: list[Item] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # found while listing (e.g. unlabeled files)
    root: str | None = None  # where file items live (a path or URI, with any ?query); None when in memory


class Tree:
    """A source directory under one pyarrow filesystem. Arguments are '/'-joined paths relative to the root.
    Each folder asked about is listed once, recursively, and grouped by its first path component (a class
    folder: a directory, or on object storage a common prefix)."""

    def __init__(self, source: str):
        self.source = source
        self.fs, self.root = storage.filesystem(source)
        info = self._info(self.root)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{source}: source not found (expected a directory, a URI or the word 'digits')")
        if info.type == pafs.FileType.File:
            raise UserError(f"{source}: not a directory (expected a dataset folder or prefix)")
        top = self._select(self.root, recursive=False)
        self.top_dirs = sorted(i.base_name for i in top if i.type == pafs.FileType.Directory)
        self.top_files = {i.base_name for i in top if i.type == pafs.FileType.File}
        # folder -> (sorted immediate sub-folders, {sub-folder or "" for files directly in it: sorted keys})
        self._listed: dict[str, tuple[list[str], dict[str, list[str]]]] = {}

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def name(self, rel: str = "") -> str:
        return storage.join(self.source.split("?", 1)[0], rel) if rel else self.source

    def _info(self, path: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(path)
        except OSError as e:
            raise UserError(f"{self.source}: cannot read source ({storage.first_line(e)})") from None

    def _select(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise UserError(f"{self.source}: cannot list {path} ({storage.first_line(e)})") from None

    def index(self, rel: str) -> tuple[list[str], dict[str, list[str]]]:
        if rel not in self._listed:
            base = self._path(rel)
            dirs: set[str] = set()
            groups: dict[str, list[str]] = {}
            for info in self._select(base, recursive=True):
                sub = info.path[len(base) + 1:] if info.path.startswith(base + "/") else None
                if not sub:
                    continue
                head, sep, _ = sub.partition("/")
                if info.type == pafs.FileType.Directory and not sep:
                    dirs.add(head)
                elif info.type == pafs.FileType.File:
                    if sep:
                        dirs.add(head)  # an object under head/ makes head a folder even without a marker
                    groups.setdefault(head if sep else "", []).append(f"{rel}/{sub}" if rel else sub)
            for keys in groups.values():
                keys.sort(key=lambda k: k.split("/"))  # as sorted(Path) orders paths: part by part
            self._listed[rel] = (sorted(dirs), groups)
        return self._listed[rel]

    def is_dir(self, rel: str) -> bool:
        return rel in self.top_dirs if "/" not in rel else self._info(self._path(rel)).type == pafs.FileType.Directory

    def is_file(self, rel: str) -> bool:
        return rel in self.top_files if "/" not in rel else self._info(self._path(rel)).type == pafs.FileType.File

    def subdirs(self, rel: str) -> list[str]:
        """Sorted names of the folders directly under ``rel`` (torchvision's find_classes)."""
        return self.top_dirs if rel == "" else self.index(rel)[0]

    def files(self, rel: str) -> list[str]:
        """Keys of every file under ``rel``, recursively, sorted as paths."""
        parent, _, name = rel.rpartition("/")
        if parent in self._listed and name:  # a class folder of an already listed split: its group
            return self._listed[parent][1].get(name, [])
        groups = self.index(rel)[1]
        return sorted((k for keys in groups.values() for k in keys), key=lambda k: k.split("/"))

    def find_text(self, names: tuple[str, ...], *rels: str) -> tuple[str, str] | None:
        """(path, text) of the first of ``names`` found in the given folders, then in up to 3 parents of the
        source (ImageNet's CSVs sit above its train/ in some layouts); one listing call."""
        dirs = [self._path(r) for r in rels]
        parent = self.root
        for _ in range(3):
            if "/" not in parent.strip("/"):
                break
            parent = parent.rsplit("/", 1)[0] or "/"
            dirs.append(parent)
        candidates = [f"{d.rstrip('/')}/{n}" for d in dirs for n in names]
        try:
            path = next((i.path for i in self.fs.get_file_info(candidates) if i.type == pafs.FileType.File), None)
        except OSError:
            return None
        return (path, self._text(path, path)) if path else None

    def read_bytes(self, rel: str, shown: str | None = None) -> bytes:
        """A file the layout needs (relative to the root, or a path inside the filesystem with ``shown``)."""
        path, shown = (rel, shown) if shown else (self._path(rel), self.name(rel))
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise UserError(f"{shown}: not found (this source layout needs it)") from None
        except OSError as e:
            raise UserError(f"{shown}: cannot read ({storage.first_line(e)})") from None

    def read_text(self, rel: str) -> str:
        return self._text(self._path(rel), self.name(rel))

    def _text(self, path: str, shown: str) -> str:
        try:
            return self.read_bytes(path, shown).decode()
        except UnicodeDecodeError as e:
            raise UserError(f"{shown}: not UTF-8 text (byte {e.start})") from None


# ---------------------------------------------------------------------------------------------------------
# Readers: (tree, val_fraction or None for the format's default, seed) -> Listing


def _split_val_fraction(items: list[Item], fraction: float | None, seed: int) -> list[Item]:
    """Move a seeded, per-class fraction (default 10%) of the items to 'val' (stratified: every class is in
    both splits)."""
    fraction = DEFAULT_VAL_FRACTION if fraction is None else fraction
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


def _class_folder_items(tree: Tree, rel: str, classes: list[str], split: str) -> list[Item]:
    for name in classes:  # a folder name with a newline would corrupt the manifest and every log line
        check_name(name, tree.name(rel))
    return [Item(split, key, label) for label, name in enumerate(classes)
            for key in tree.files(f"{rel}/{name}" if rel else name)]


def _synset_names(tree: Tree, wnids: list[str]) -> list[str]:
    """Readable names from ImageNet's LOC_synset_mapping.txt when present, else the wnids themselves."""
    found = tree.find_text(("LOC_synset_mapping.txt", "synset_words.txt"), "")
    if not found:
        return list(wnids)
    names = {}
    for line in found[1].splitlines():
        wnid, _, words = line.partition(" ")
        names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def read_class_folders(tree: Tree, val_fraction: float | None, seed: int) -> Listing:
    """ImageNet's layout (train/<class>/, val/<class>/ or a flat val/ + LOC_val_solution.csv), or plain
    class folders split by ``val_fraction``."""
    if not tree.is_dir("train"):
        classes = tree.subdirs("")
        if not classes:
            raise UserError(f"{tree.name()}: no class folders found (expected SOURCE/<class>/* or "
                            "SOURCE/train/<class>/*)")
        tree.index("")  # one listing of the whole source, grouped by class
        items = _class_folder_items(tree, "", classes, "train")
        return Listing("folders", classes, items=_split_val_fraction(items, val_fraction, seed),
                       root=tree.source)

    classes = tree.subdirs("train")
    if not classes:
        raise UserError(f"{tree.name('train')}: no class folders found (expected train/<class>/*)")
    is_wnid = all(c.startswith("n") and c[1:].isdigit() for c in classes)
    listing = Listing(
        "imagenet" if is_wnid else "folders",
        _synset_names(tree, classes) if is_wnid else classes,
        wnids=classes if is_wnid else None,
        items=_class_folder_items(tree, "train", classes, "train"),
        root=tree.source,
    )
    if not tree.is_dir("val"):
        _split_val_fraction(listing.items, val_fraction, seed)
    elif val_classes := tree.subdirs("val"):
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{tree.name('val')}: class folders not in train/: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        listing.items.extend(Item("val", key, index[name]) for name in val_classes
                             for key in tree.files(f"val/{name}"))
    else:
        listing.items.extend(_flat_imagenet_val(tree, classes, listing))
    return listing


def _flat_imagenet_val(tree: Tree, classes: list[str], listing: Listing) -> list[Item]:
    """ImageNet's flat validation folder, labelled by LOC_val_solution.csv (ImageId, PredictionString)."""
    found = tree.find_text(("LOC_val_solution.csv",), "", "val")
    if found is None:
        raise UserError(f"{tree.name('val')}: flat validation folder without labels (expected "
                        f"LOC_val_solution.csv in {tree.name()})")
    solution, text = found
    solution_name = PurePosixPath(solution).name
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        wnid = row["PredictionString"].split()[0]
        if wnid not in index:
            raise UserError(f"{solution}: image {row['ImageId']} has class {wnid}, not in train/")
        labels[row["ImageId"]] = index[wnid]
    items = []
    for key in tree.files("val"):
        label = labels.get(PurePosixPath(key).stem)
        if label is None:
            listing.rejects.append({"path": key, "split": "val", "reason": f"no label in {solution_name}"})
            continue
        items.append(Item("val", key, label))
    return items


def read_tiny_imagenet(tree: Tree, val_fraction: float | None, seed: int) -> Listing:
    """Tiny ImageNet: wnids.txt, words.txt, train/<wnid>/images/*, val/images/* + val/val_annotations.txt."""
    wnids = sorted(check_name(w, tree.name("wnids.txt")) for w in tree.read_text("wnids.txt").split())
    lines = tree.read_text("words.txt").splitlines() if tree.is_file("words.txt") else []
    words = {wnid: text.split(",")[0].strip() for wnid, _, text in (line.partition("\t") for line in lines)}
    listing = Listing("tiny_imagenet", [words.get(w, w) for w in wnids], wnids=wnids, root=tree.source)
    index = {w: i for i, w in enumerate(wnids)}
    tree.index("train")  # one listing of train/, grouped by wnid
    for wnid in wnids:
        for key in tree.files(f"train/{wnid}"):
            if key.endswith("_boxes.txt"):
                continue  # bounding boxes, part of the layout, not an image
            listing.items.append(Item("train", key, index[wnid]))
    if tree.is_file("val/val_annotations.txt"):
        labels = {}
        for line in tree.read_text("val/val_annotations.txt").splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                labels[parts[0]] = parts[1]
        for key in tree.files("val/images"):
            wnid = labels.get(PurePosixPath(key).name)
            if wnid not in index:
                listing.rejects.append({"path": key, "split": "val", "reason": "no label in val_annotations.txt"})
                continue
            listing.items.append(Item("val", key, index[wnid]))
    else:
        _split_val_fraction(listing.items, val_fraction, seed)
    return listing


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, strings and numpy arrays: rebuilding those is all a file may ask
    for. Any other global (os.system, builtins.eval, ...) is refused, so a crafted file runs no code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def read_cifar100(tree: Tree, val_fraction: float | None, seed: int) -> Listing:
    """CIFAR-100's python pickles (train, test, meta); fine labels; 'test' becomes the val split."""

    def unpickle(name: str) -> dict:
        try:
            data = _ArrayUnpickler(io.BytesIO(tree.read_bytes(name)), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{tree.name(name)}: not a CIFAR-100 pickle ({storage.first_line(e)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{tree.name(name)}: not a CIFAR-100 pickle (expected a dict, got {type(data).__name__})")
        return data

    meta = unpickle("meta")
    if "fine_label_names" not in meta:
        raise UserError(f"{tree.name('meta')}: missing 'fine_label_names' (expected CIFAR-100's meta file)")
    listing = Listing("cifar100", list(meta["fine_label_names"]))
    for split, name in (("train", "train"), ("val", "test")):
        batch = unpickle(name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            files = batch["filenames"] if "filenames" in batch else [f"{i:05d}.png" for i in range(len(data))]
            listing.items += [Item(split, f"{name}/{file}", int(label), pixels=pixels.tobytes(), shape=(32, 32))
                              for pixels, label, file in zip(data, batch["fine_labels"], files, strict=True)]
        except (KeyError, ValueError, TypeError) as e:  # zip(strict=True): as many labels as images
            raise UserError(f"{tree.name(name)}: not a CIFAR-100 batch ({storage.first_line(e)}; expected "
                            "'data' of N x 3072 bytes and N 'fine_labels')") from None
    return listing


def read_digits(tree: Tree | None, val_fraction: float | None, seed: int) -> Listing:
    """scikit-learn's 1,797 8x8 digits (built in: no source folder), upscaled to 32x32 RGB; a seeded,
    stratified split, 20% val unless ``val_fraction`` says otherwise."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    fraction = DIGITS_VAL_FRACTION if val_fraction is None else val_fraction
    train_idx = idx if fraction == 0 else train_test_split(
        idx, test_size=fraction, random_state=seed, stratify=digits.target)[0]
    train_set = set(train_idx.tolist())
    listing = Listing("digits", [str(d) for d in digits.target_names])
    for i in idx:
        gray = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = Image.fromarray(gray).resize((32, 32), Image.BILINEAR).convert("RGB")
        split = "train" if i in train_set else "val"
        listing.items.append(
            Item(split, f"digits/{i:04d}", int(digits.target[i]), pixels=big.tobytes(), shape=big.size[::-1])
        )
    return listing


Reader = Callable[[Tree, "float | None", int], Listing]
# --format's choices. A new layout is one reader function and one entry here (and a rule in detect_format).
READERS: dict[str, Reader] = {
    "imagenet": read_class_folders,
    "folders": read_class_folders,
    "tiny_imagenet": read_tiny_imagenet,
    "cifar100": read_cifar100,
    "digits": read_digits,  # built in: the source is the word 'digits'
}


def detect_format(tree: Tree) -> str:
    """Name the layout of a source from the files that define it."""
    if {"meta", "train", "test"} <= tree.top_files:
        return "cifar100"
    if "wnids.txt" in tree.top_files:
        return "tiny_imagenet"
    if tree.top_dirs:
        return "folders"
    raise UserError(
        f"{tree.source}: unrecognised source layout (expected class folders, train/<class>/, Tiny ImageNet's "
        "wnids.txt, or CIFAR-100's train/test/meta pickles); name one with --format"
    )


def list_source(source: str, fmt: str | None, val_fraction: float | None, seed: int) -> Listing:
    """Resolve SOURCE (a path, a pyarrow.fs URI or 'digits') and list it with the reader for its format."""
    if fmt is not None and fmt not in READERS:
        raise UserError(f"--format {fmt}: unknown format; expected one of {', '.join(READERS)}")
    if source == "digits" or fmt == "digits":
        return read_digits(None, val_fraction, seed)
    tree = Tree(source)
    fmt = fmt or detect_format(tree)
    log.info("listing %s as %s", source, fmt)
    return READERS[fmt](tree, val_fraction, seed)
