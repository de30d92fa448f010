"""Listing sources through one pyarrow.fs lister: every layout reads the same from a path and from a URI,
hostile pickles run no code, the digits split follows --val-fraction and --seed (no Ray: listing only)."""

import pickle

import pytest

from tests.support.data import jpeg_bytes, make_cifar100, make_class_tree, make_tiny_imagenet
from vitlab.data.sources import READERS, list_source
from vitlab.errors import UserError


def as_rows(listing):
    return [(it.split, it.key, it.label, it.pixels) for it in listing.items]


def same_listing(source, uri, fmt=None):
    local, remote = list_source(str(source), fmt, None, 0), list_source(uri, fmt, None, 0)
    assert local.format == remote.format and local.classes == remote.classes and local.wnids == remote.wnids
    assert as_rows(local) == as_rows(remote) and local.rejects == remote.rejects
    if local.root is not None:  # file items: read from <root>/<key>
        assert remote.root == uri and local.root == str(source)
    return local


@pytest.mark.parametrize("split_dirs", [True, False], ids=["imagenet", "folders"])
def test_class_folders_from_a_path_and_a_uri(tmp_path, split_dirs):
    classes = ["n02", "n01", "n10"] if split_dirs else ["dog", "cat", "Zebra"]
    src = make_class_tree(tmp_path / "src tree", classes, per_class=5, val_per_class=2, split_dirs=split_dirs)
    (src / "train" / "n02" / "deeper" if split_dirs else src / "dog" / "deeper").mkdir()
    listing = same_listing(src, src.as_uri())
    assert listing.format == ("imagenet" if split_dirs else "folders") and listing.classes == sorted(classes)
    first = "train/n01/n01_" if split_dirs else "Zebra/Zebra_"  # sorted classes, then sorted files
    assert [it.key for it in listing.items if it.split == "train"][:2] == [f"{first}0.JPEG", f"{first}1.JPEG"]
    counts = {s: sum(it.split == s for it in listing.items) for s in ("train", "val")}
    assert counts == ({"train": 15, "val": 6} if split_dirs else {"train": 12, "val": 3})  # at least 1 per class


def test_tiny_imagenet_and_cifar100_from_a_uri(tmp_path):
    tiny = make_tiny_imagenet(tmp_path / "tiny", ["n03", "n01", "n02"])
    listing = same_listing(tiny, tiny.as_uri())
    assert listing.format == "tiny_imagenet" and listing.wnids == ["n01", "n02", "n03"]
    assert sum(it.split == "val" for it in listing.items) == 6 and not listing.rejects
    cifar = make_cifar100(tmp_path / "cifar-100-python", n_train=6, n_test=4, classes=3)
    listing = same_listing(cifar, cifar.as_uri())
    assert listing.format == "cifar100" and listing.root is None  # pixels in memory
    assert [it.split for it in listing.items].count("val") == 4 and listing.items[0].shape == (32, 32)


def test_a_hostile_cifar_pickle_runs_no_code(tmp_path):
    src = make_cifar100(tmp_path / "cifar", n_train=2, n_test=2, classes=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    (src / "train").write_bytes(pickle.dumps({"data": Exploit(), "fine_labels": [0]}))
    with pytest.raises(UserError, match=r"cifar/train: not a CIFAR-100 pickle \(refused to load builtins\.exec"):
        list_source(str(src), None, None, 0)
    assert not marker.exists()
    (src / "train").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(UserError, match="not a CIFAR-100 pickle"):
        list_source(str(src), "cifar100", None, 0)


def test_digits_split_follows_val_fraction_and_seed():
    default = list_source("digits", None, None, 0)
    val = sorted(it.key for it in default.items if it.split == "val")
    assert len(val) == 360 and len(default.items) == 1797  # 20% by default
    assert sorted(it.key for it in list_source("digits", None, None, 1).items if it.split == "val") != val
    assert sum(it.split == "val" for it in list_source("digits", None, 0.1, 0).items) == 180
    assert READERS["digits"](None, None, 0).classes == [str(d) for d in range(10)]


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        list_source(str(tmp_path / "missing"), None, None, 0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        list_source(str(tmp_path / "file.txt"), None, None, 0)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(jpeg_bytes(0, 0))
    with pytest.raises(UserError, match="unrecognised source layout"):
        list_source(str(tmp_path / "flat"), None, None, 0)
    with pytest.raises(UserError, match=r"flat/wnids\.txt: not found"):
        list_source(str(tmp_path / "flat"), "tiny_imagenet", None, 0)
