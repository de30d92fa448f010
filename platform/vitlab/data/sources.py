"""One reader per source layout. Each lists a source into class names and items (key, label, split, and
either a file to read or the raw pixels of an in-memory image); reading and validating the bytes happens
later, in the prepare job's Ray tasks, so listing stays cheap even for ImageNet's 1.3M files.

Class indices follow torchvision's ``ImageFolder``: sorted folder names.

The class-folder layouts (ImageNet, plain folders) can also be listed from a URI that ``pyarrow.fs`` reads
(s3://, gs://, file://): one recursive listing per split root, grouped by class folder (a common prefix),
and items carry URIs that the prepare tasks read through the same kind of filesystem.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.fs as pafs

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
    uri: str | None = None  # the source URI (with any ?query) when items are URIs, so tasks can open its filesystem


def _class_dirs(root: Path) -> list[str]:
    """Exactly torchvision.datasets.folder.find_classes: sorted names of the sub-directories."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _key_order(key: str) -> list[str]:
    """Sort keys as ``sorted(Path)`` sorts paths (part by part), so local and URI listings agree."""
    return key.split("/")


class _LocalTree:
    """A source directory on this machine; ``rel`` arguments are '/'-joined paths relative to it."""

    def __init__(self, root: Path):
        self.root = root

    def name(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def index(self, rel: str) -> None:
        """Nothing to do locally: directories are walked on demand."""

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def subdirs(self, rel: str) -> list[str]:
        return _class_dirs(self.root / rel)

    def files(self, rel: str) -> list[str]:
        return [str(f.relative_to(self.root)) for f in _files_under(self.root / rel)]

    def item_path(self, key: str) -> str:
        return str(self.root / key)

    def find_file(self, names: tuple[str, ...], *rels: str) -> str | None:
        """The first of ``names`` in the given folders, then in up to 3 parents of the source."""
        found = _find_file(names, *(self.root / r for r in rels), *self.root.parents[:3])
        return str(found) if found else None

    def read_text(self, path: str) -> str:
        return Path(path).read_text()


class _UriTree:
    """A source under a pyarrow.fs URI. Each split root is listed once, recursively, and grouped by its
    first path component (a class folder: a directory or a common prefix)."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as e:
            raise UserError(f"{uri}: cannot open source URI ({_first_line(e)})") from None
        self.root = root.rstrip("/")
        self.base_uri = uri.split("?", 1)[0].rstrip("/")  # item URIs: base_uri + "/" + key
        info = self._info(self.root)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{uri}: source not found")
        if info.type == pafs.FileType.File:
            raise UserError(f"{uri}: not a directory (expected a dataset prefix)")
        top = self._select(self.root, recursive=False)
        self.top_dirs = {i.base_name for i in top if i.type == pafs.FileType.Directory}
        self.top_files = {i.base_name for i in top if i.type == pafs.FileType.File}
        # rel of an indexed root -> (sorted immediate sub-folders, {sub-folder or "": sorted keys under it})
        self._indexed: dict[str, tuple[list[str], dict[str, list[str]]]] = {}

    def _info(self, path: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(path)
        except OSError as e:
            raise UserError(f"{self.uri}: cannot read source ({_first_line(e)})") from None

    def _select(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise UserError(f"{self.uri}: cannot list {path} ({_first_line(e)})") from None

    def name(self, rel: str = "") -> str:
        return f"{self.base_uri}/{rel}" if rel else self.uri

    def index(self, rel: str) -> None:
        """One recursive listing of ``rel`` (a split root), grouped by class folder."""
        if rel in self._indexed:
            return
        base = f"{self.root}/{rel}" if rel else self.root
        dirs: set[str] = set()
        groups: dict[str, list[str]] = {}
        for info in self._select(base, recursive=True):
            sub = info.path[len(base) + 1:] if info.path.startswith(base + "/") else None
            if not sub:
                continue
            head, sep, _ = sub.partition("/")
            if info.type == pafs.FileType.Directory:
                if not sep:
                    dirs.add(head)
            elif info.type == pafs.FileType.File:
                if sep:
                    dirs.add(head)  # an object under head/ makes head a folder even without a marker
                groups.setdefault(head if sep else "", []).append(f"{rel}/{sub}" if rel else sub)
        for keys in groups.values():
            keys.sort(key=_key_order)
        self._indexed[rel] = (sorted(dirs), groups)

    def _covering(self, rel: str) -> tuple[str, str] | None:
        for root in self._indexed:
            if rel == root:
                return root, ""
            if root == "" or rel.startswith(root + "/"):
                return root, rel[len(root) + 1:] if root else rel
        return None

    def is_dir(self, rel: str) -> bool:
        if "/" not in rel:
            return rel in self.top_dirs
        return self._info(f"{self.root}/{rel}").type == pafs.FileType.Directory

    def subdirs(self, rel: str) -> list[str]:
        if rel == "" and "" not in self._indexed:
            return sorted(self.top_dirs)
        if self._covering(rel) is None:
            self.index(rel)
        root, sub = self._covering(rel)  # type: ignore[misc]
        if not sub:
            return self._indexed[root][0]
        prefix = sub + "/"
        keys = self._files_in(root, sub)
        start = len(root) + 1 + len(prefix) if root else len(prefix)
        return sorted({k[start:].split("/")[0] for k in keys if "/" in k[start:]})

    def _files_in(self, root: str, sub: str) -> list[str]:
        groups = self._indexed[root][1]
        if not sub:
            return sorted((k for keys in groups.values() for k in keys), key=_key_order)
        head, sep, _ = sub.partition("/")
        keys = groups.get(head, [])
        if not sep:
            return keys
        prefix = f"{root}/{sub}/" if root else f"{sub}/"
        return [k for k in keys if k.startswith(prefix)]

    def files(self, rel: str) -> list[str]:
        if self._covering(rel) is None:
            self.index(rel)
        root, sub = self._covering(rel)  # type: ignore[misc]
        return self._files_in(root, sub)

    def item_path(self, key: str) -> str:
        return f"{self.base_uri}/{key}"

    def find_file(self, names: tuple[str, ...], *rels: str) -> str | None:
        """The first of ``names`` in the given folders, then in up to 3 parents of the source (one call)."""
        dirs = [f"{self.root}/{r}" if r else self.root for r in rels]
        parent = self.root
        for _ in range(3):
            if "/" not in parent.strip("/"):
                break
            parent = parent.rsplit("/", 1)[0] or "/"
            dirs.append(parent)
        candidates = [f"{d.rstrip('/')}/{n}" for d in dirs for n in names]
        try:
            infos = self.fs.get_file_info(candidates)
        except OSError:
            return None
        return next((i.path for i in infos if i.type == pafs.FileType.File), None)

    def read_text(self, path: str) -> str:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({_first_line(e)})") from None


Tree = _LocalTree | _UriTree


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _class_folder_items(tree: Tree, rel: str, classes: list[str], split: str) -> list[Item]:
    items = []
    for label, name in enumerate(classes):
        for key in tree.files(f"{rel}/{name}" if rel else name):
            items.append(Item(split, key, label, path=tree.item_path(key)))
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


def _synset_names(tree: Tree, wnids: list[str]) -> list[str]:
    """Readable names from ImageNet's LOC_synset_mapping.txt when present, else the wnids themselves."""
    mapping_file = tree.find_file(("LOC_synset_mapping.txt", "synset_words.txt"), "")
    if not mapping_file:
        return list(wnids)
    names = {}
    for line in tree.read_text(mapping_file).splitlines():
        wnid, _, words = line.partition(" ")
        names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def read_class_folders(source: Path | Tree, val_fraction: float, seed: int) -> Listing:
    """ImageNet's layout (train/<class>/, val/<class>/ or a flat val/ + LOC_val_solution.csv), or plain
    class folders split by ``val_fraction``. ``source`` is a local directory or a listed URI."""
    tree = _LocalTree(source) if isinstance(source, Path) else source
    uri = tree.uri if isinstance(tree, _UriTree) else None
    if not tree.is_dir("train"):
        tree.index("")
        classes = tree.subdirs("")
        if not classes:
            raise UserError(
                f"{tree.name()}: no class folders found (expected SOURCE/<class>/* or SOURCE/train/<class>/*)"
            )
        items = _class_folder_items(tree, "", classes, "train")
        return Listing("folders", classes, items=_split_val_fraction(items, val_fraction, seed), uri=uri)

    classes = tree.subdirs("train")
    if not classes:
        raise UserError(f"{tree.name('train')}: no class folders found (expected train/<class>/*)")
    is_wnid = all(c.startswith("n") and c[1:].isdigit() for c in classes)
    listing = Listing(
        "imagenet" if is_wnid else "folders",
        _synset_names(tree, classes) if is_wnid else classes,
        wnids=classes if is_wnid else None,
        items=_class_folder_items(tree, "train", classes, "train"),
        uri=uri,
    )
    if not tree.is_dir("val"):
        _split_val_fraction(listing.items, val_fraction, seed)
    elif val_classes := tree.subdirs("val"):
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{tree.name('val')}: class folders not in train/: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        for name in val_classes:
            for key in tree.files(f"val/{name}"):
                listing.items.append(Item("val", key, index[name], path=tree.item_path(key)))
    else:
        listing.items.extend(_flat_imagenet_val(tree, classes, listing))
    return listing


def _flat_imagenet_val(tree: Tree, classes: list[str], listing: Listing) -> list[Item]:
    """ImageNet's flat validation folder, labelled by LOC_val_solution.csv (ImageId, PredictionString)."""
    solution = tree.find_file(("LOC_val_solution.csv",), "", "val")
    if solution is None:
        raise UserError(
            f"{tree.name('val')}: flat validation folder without labels (expected LOC_val_solution.csv in "
            f"{tree.name()})"
        )
    solution_name = PurePosixPath(solution).name
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(tree.read_text(solution), newline="")):
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
        items.append(Item("val", key, label, path=tree.item_path(key)))
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


URI_FORMATS = ("imagenet", "folders")


def _detect_uri_format(tree: _UriTree) -> str:
    """The local rules on one listing of the URI's top level; only the class-folder layouts are read."""
    if {"meta", "train", "test"} <= tree.top_files or "wnids.txt" in tree.top_files:
        raise UserError(f"{tree.uri}: URI sources support the imagenet and folders layouts; copy it locally")
    if tree.top_dirs:
        return "folders"
    raise UserError(
        f"{tree.uri}: no class folders found (expected SOURCE/<class>/* or SOURCE/train/<class>/*)"
    )


def list_source(source: str, fmt: str | None, val_fraction: float, seed: int) -> Listing:
    """Resolve SOURCE (a path, a pyarrow.fs URI or 'digits') and list it with the reader for its format."""
    if source == "digits" or fmt == "digits":
        return read_digits()
    if fmt is not None and fmt not in READERS:
        raise UserError(f"--format {fmt}: unknown format; expected one of {', '.join(READERS)}")
    if "://" in source:
        if fmt is not None and fmt not in URI_FORMATS:
            raise UserError(f"{source}: URI sources support the imagenet and folders layouts, not --format {fmt}")
        tree = _UriTree(source)
        fmt = fmt or _detect_uri_format(tree)
        log.info("listing %s as %s", source, fmt)
        return read_class_folders(tree, val_fraction, seed)
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
