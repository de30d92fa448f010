"""vitlab data prepare: every source format, ImageNet's faults, manifest == Parquet, atomic output."""

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.data import jpeg_bytes, make_cifar100, make_class_tree, make_tiny_imagenet, png_bomb
from vitlab.data.prepare import EncodeOptions, prepare
from vitlab.errors import UserError


def read_split(out: Path, split: str) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "label": [], "key": [], "height": [], "width": []}
    for f in sorted((out / split).glob("*.parquet")):
        t = pq.read_table(f)
        assert t.column_names == ["image", "label", "key", "height", "width"]
        for k in rows:
            rows[k].extend(t.column(k).to_pylist())
    return rows


def check_manifest_matches_shards(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        total = 0
        for shard in info["shards"]:
            path = out / shard["file"]
            assert pq.read_metadata(path).num_rows == shard["rows"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            total += shard["rows"]
        assert total == info["rows"] == len(read_split(out, split)["key"])
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "temporary build directory left behind"
    return manifest


def test_imagenet_layout_with_faults_matches_imagefolder(ray_session, tmp_path):
    from torchvision.datasets import ImageFolder

    src = make_class_tree(tmp_path / "src", ["n02", "n01", "n10"], per_class=4, val_per_class=2)
    good = src / "train" / "n01" / "n01_0.JPEG"
    bad = src / "train" / "n02"
    cmyk = Image.open(io.BytesIO(jpeg_bytes(0, 9))).convert("CMYK")
    cmyk.save(bad / "cmyk.JPEG", "JPEG")
    Image.open(io.BytesIO(jpeg_bytes(0, 10))).convert("L").save(bad / "gray.JPEG", "JPEG")
    Image.open(io.BytesIO(jpeg_bytes(0, 11))).save(bad / "png_named.JPEG", "PNG")
    full = jpeg_bytes(0, 12, size=(64, 48))
    (bad / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (bad / "empty.JPEG").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")
    (bad / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (bad / "bomb.png").write_bytes(png_bomb())  # 30000 x 30000 declared: one reject, not a failed prepare

    out = tmp_path / "out"
    manifest = prepare(str(src), str(out))
    manifest = check_manifest_matches_shards(out)
    assert manifest["format"] == "imagenet"
    assert manifest["classes"] == ["n01", "n02", "n10"] and manifest["wnids"] == ["n01", "n02", "n10"]
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejects"]}
    assert set(rejected) == {"truncated.JPEG", "empty.JPEG", "notes.txt", ".DS_Store", "bomb.png"}
    assert "decompression bomb" in rejected["bomb.png"]
    assert "empty" in rejected["empty.JPEG"] and "truncated" in rejected["truncated.JPEG"]
    assert "not an image" in rejected["notes.txt"]
    assert manifest["splits"]["train"]["rows"] == 12 + 3 and manifest["splits"]["val"]["rows"] == 6

    rows = read_split(out, "train")
    by_key = dict(zip(rows["key"], range(len(rows["key"])), strict=True))
    # converted files are kept as RGB JPEGs
    for name in ("cmyk.JPEG", "gray.JPEG", "png_named.JPEG"):
        i = by_key[f"train/n02/{name}"]
        im = Image.open(io.BytesIO(rows["image"][i]))
        assert im.format == "JPEG" and im.mode == "RGB" and rows["label"][i] == 1
    # valid RGB JPEGs are copied byte for byte
    assert rows["image"][by_key["train/n01/n01_0.JPEG"]] == good.read_bytes()
    # class index and labels exactly as torchvision's ImageFolder assigns them
    folder = ImageFolder(str(src / "train"))
    assert folder.classes == manifest["classes"]
    for path, label in folder.samples:
        key = str(Path(path).relative_to(src))
        if key in by_key:
            assert rows["label"][by_key[key]] == label


def test_plain_class_folders_split_by_val_fraction(ray_session, tmp_path):
    src = make_class_tree(tmp_path / "src", ["cat", "dog"], per_class=10, split_dirs=False)
    out = tmp_path / "out"
    manifest = prepare(str(src), str(out), val_fraction=0.2, opts=EncodeOptions(max_side=16, quality=80))
    check_manifest_matches_shards(out)
    assert manifest["format"] == "folders" and manifest["classes"] == ["cat", "dog"]
    assert manifest["splits"]["val"]["rows"] == 4 and manifest["splits"]["train"]["rows"] == 16
    rows = read_split(out, "val")
    assert sorted(rows["label"]) == [0, 0, 1, 1]
    assert all(max(h, w) == 16 for h, w in zip(rows["height"], rows["width"], strict=True))
    assert Image.open(io.BytesIO(rows["image"][0])).size == (16, 13)  # 24x20 -> max side 16
    assert manifest["encoding"]["max_side"] == 16 and manifest["encoding"]["quality"] == 80


def test_flat_imagenet_val_with_solution_csv(ray_session, tmp_path):
    src = make_class_tree(tmp_path / "src", ["n01", "n02"], per_class=3, val_per_class=0)
    (src / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        (src / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg_bytes(i, i))
        lines.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 1 5 5 {wnid} 2 2 6 6")
    (src / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish, Carassius auratus\n")
    out = tmp_path / "out"
    manifest = prepare(str(src), str(out))
    check_manifest_matches_shards(out)
    assert manifest["classes"] == ["tench", "goldfish"] and manifest["wnids"] == ["n01", "n02"]
    rows = read_split(out, "val")
    labels = dict(zip(rows["key"], rows["label"], strict=True))
    assert labels == {"val/ILSVRC2012_val_00000000.JPEG": 1, "val/ILSVRC2012_val_00000001.JPEG": 0,
                      "val/ILSVRC2012_val_00000002.JPEG": 1}


def test_tiny_imagenet_layout(ray_session, tmp_path):
    wnids = ["n03", "n01", "n02"]
    src = make_tiny_imagenet(tmp_path / "tiny", wnids)
    out = tmp_path / "out"
    manifest = prepare(str(src), str(out))
    check_manifest_matches_shards(out)
    assert manifest["format"] == "tiny_imagenet"
    assert manifest["wnids"] == ["n01", "n02", "n03"]
    assert manifest["classes"] == ["name n01", "name n02", "name n03"]
    assert manifest["splits"]["train"]["rows"] == 9 and manifest["splits"]["val"]["rows"] == 6
    assert manifest["rejects"] == []  # *_boxes.txt belongs to the layout
    rows = read_split(out, "val")
    labels = dict(zip(rows["key"], rows["label"], strict=True))
    # val_0/1 belong to wnids[0] = n03 (index 2 once sorted)
    assert labels["val/images/val_0.JPEG"] == 2 and labels["val/images/val_2.JPEG"] == 0


def test_cifar100_pickles(ray_session, tmp_path):
    src = make_cifar100(tmp_path / "cifar-100-python", n_train=20, n_test=10, classes=5)
    out = tmp_path / "out"
    manifest = prepare(str(src), str(out))
    check_manifest_matches_shards(out)
    assert manifest["format"] == "cifar100" and manifest["classes"] == [f"class_{i}" for i in range(5)]
    assert manifest["splits"]["train"]["rows"] == 20 and manifest["splits"]["val"]["rows"] == 10
    rows = read_split(out, "val")
    assert set(rows["label"]) == set(range(5)) and set(rows["height"]) == {32}
    assert Image.open(io.BytesIO(rows["image"][0])).mode == "RGB"


def test_digits_is_real_and_split_is_fixed(digits_dir):
    out = Path(digits_dir)
    manifest = check_manifest_matches_shards(out)
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 1797
    assert manifest["splits"]["val"]["rows"] == 360
    val = read_split(out, "val")
    im = Image.open(io.BytesIO(val["image"][0]))
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    from vitlab.data.sources import read_digits

    again = read_digits(None, None, 0)
    assert sorted(it.key for it in again.items if it.split == "val") == sorted(val["key"])


def test_existing_output_needs_overwrite_and_is_replaced_atomically(ray_session, tmp_path):
    src = make_class_tree(tmp_path / "src", ["a", "b"], per_class=2, val_per_class=1)
    out = tmp_path / "out"
    prepare(str(src), str(out))
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        prepare(str(src), str(out))
    first = json.loads((out / "manifest.json").read_text())
    make_class_tree(src, ["c"], per_class=3, val_per_class=1)  # new content: the replacement must show it
    (tmp_path / ".out.partial-999999999-deadbeef").mkdir()  # a killed prepare's leftover (its process is gone)
    prepare(str(src), str(out), overwrite=True)
    second = check_manifest_matches_shards(out)
    assert first["classes"] == ["a", "b"] and second["classes"] == ["a", "b", "c"]
    assert (first["splits"]["train"]["rows"], second["splits"]["train"]["rows"]) == (4, 7)
    assert {s["sha256"] for s in first["splits"]["train"]["shards"]}.isdisjoint(
        s["sha256"] for s in second["splits"]["train"]["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no partial or old copy left


@pytest.mark.parametrize("split_dirs", [True, False], ids=["imagenet", "folders"])
def test_uri_source_matches_local_path(ray_session, tmp_path, split_dirs):
    """The same tree prepared from its path and from its file:// URI (pyarrow.fs, as for s3://) agrees."""
    classes = ["n02", "n01", "n10"] if split_dirs else ["dog", "cat", "Zebra"]
    src = make_class_tree(tmp_path / "src tree", classes, per_class=5, val_per_class=2, split_dirs=split_dirs)
    faults = src / "train" / classes[0] if split_dirs else src / classes[0]
    (faults / "empty.JPEG").write_bytes(b"")
    (faults / "notes.txt").write_text("not an image")
    (faults / "nested").mkdir()
    (faults / "nested" / "deep.JPEG").write_bytes(jpeg_bytes(0, 99))

    local = prepare(str(src), str(tmp_path / "out_local"), val_fraction=0.3)
    uri = prepare(src.as_uri(), str(tmp_path / "out_uri"), val_fraction=0.3)
    check_manifest_matches_shards(tmp_path / "out_uri")
    assert uri["source"] == src.as_uri()
    assert uri["format"] == local["format"] == ("imagenet" if split_dirs else "folders")
    assert uri["classes"] == local["classes"] == sorted(classes) and uri["wnids"] == local["wnids"]
    for split in ("train", "val"):
        assert uri["splits"][split]["rows"] == local["splits"][split]["rows"] > 0
        a, b = read_split(tmp_path / "out_local", split), read_split(tmp_path / "out_uri", split)
        rows_a = sorted(zip(a["key"], a["label"], a["image"], strict=True))
        assert rows_a == sorted(zip(b["key"], b["label"], b["image"], strict=True))
    assert uri["rejects"] == local["rejects"]
    assert {Path(r["path"]).name for r in uri["rejects"]} == {"empty.JPEG", "notes.txt"}
