"""model.init_from: weights files, checkpoints and run directories adapted to the job's model; hub names and
code-carrying pickles refused."""

from __future__ import annotations

import hashlib
import os

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from vitlab.errors import UserError
from vitlab.train.init_from import load_init_weights


def tiny(num_classes=10, img_size=32, depth=2, embed_dim=48, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size,
                             patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=4)


def save(obj, path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path.read_bytes()


def one_line_error(spec, model, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_init_weights(str(spec), model)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_other_classes_and_image_size_reset_the_head_and_resample_pos_embed(tmp_path):
    source, target = tiny(10, 32, seed=0), tiny(7, 48, seed=1)
    src, fresh = source.state_dict(), {k: v.clone() for k, v in target.state_dict().items()}
    save(src, tmp_path / "w.pt")

    init = load_init_weights(str(tmp_path / "w.pt"), target)

    sd = init.state_dict
    for key in fresh:
        if key.startswith("head."):
            assert torch.equal(sd[key], fresh[key]), key  # the model's own fresh head
        elif key != "pos_embed":
            assert torch.equal(sd[key], src[key]), key
    assert sd["pos_embed"].shape == fresh["pos_embed"].shape == (1, 1 + 12 * 12, 48)
    assert torch.equal(sd["pos_embed"][:, :1], src["pos_embed"][:, :1])  # the class token's, as it was
    assert not torch.equal(sd["pos_embed"], fresh["pos_embed"])
    assert torch.equal(sd["pos_embed"], resample_abs_pos_embed(src["pos_embed"], [12, 12], num_prefix_tokens=1))
    assert init.notes == ["head reset (10 -> 7 classes)", "pos_embed resampled (8x8 -> 12x12 patches)"]
    target.load_state_dict(sd, strict=True)


def test_same_architecture_loads_unchanged(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    save(source.state_dict(), tmp_path / "w.pt")

    init = load_init_weights(str(tmp_path / "w.pt"), target)

    assert init.notes == [] and init.source == str(tmp_path / "w.pt")
    assert list(init.state_dict) == list(target.state_dict())
    assert all(torch.equal(init.state_dict[k], v) for k, v in source.state_dict().items())
    target.load_state_dict(init.state_dict, strict=True)


def test_file_checkpoint_and_run_directory_forms(tmp_path):
    source = tiny(seed=0)
    src = source.state_dict()
    wrapped = {f"module.{k}": v for k, v in src.items()}  # saved from under DDP
    forms = {
        tmp_path / "plain.pt": (tmp_path / "plain.pt", src),
        tmp_path / "run" / "checkpoint_000001": (tmp_path / "run" / "checkpoint_000001" / "state.pt",
                                                 {"model": wrapped, "epoch": 3, "optimizer": {}}),
        tmp_path / "run2": (tmp_path / "run2" / "best_model.pt", {f"_orig_mod.{k}": v for k, v in src.items()}),
    }
    for spec, (file, obj) in forms.items():
        data = save(obj, file)
        init = load_init_weights(str(spec), tiny(seed=1))
        assert init.sha256 == hashlib.sha256(data).hexdigest(), spec
        assert init.notes == [], spec
        assert all(torch.equal(init.state_dict[k], v) for k, v in src.items()), spec
    # a URI goes through pyarrow's filesystems, as s3:// does
    init = load_init_weights(f"file://{tmp_path}/run2", tiny(seed=1))
    assert init.sha256 == hashlib.sha256((tmp_path / "run2" / "best_model.pt").read_bytes()).hexdigest()


def test_a_directory_without_weights_is_refused(tmp_path):
    message = one_line_error(tmp_path, tiny(), "a directory without state.pt or best_model.pt")
    assert str(tmp_path) in message


@pytest.mark.parametrize(("kwargs", "key", "what"), [
    ({"depth": 3}, "blocks.2.norm1.weight", "is missing from the weights"),
    ({"embed_dim": 64}, "cls_token", "has shape [1, 1, 48] in the weights, [1, 1, 64] in the model"),
])
def test_another_architecture_names_the_key(tmp_path, kwargs, key, what):
    save(tiny().state_dict(), tmp_path / "w.pt")
    message = one_line_error(tmp_path / "w.pt", tiny(**kwargs), "model.init_from")
    assert f"'{key}' {what}" in message and "more)" in message and "vit_tiny_patch16_224" in message


def test_unexpected_keys_are_refused(tmp_path):
    save(tiny(depth=3).state_dict(), tmp_path / "w.pt")
    message = one_line_error(tmp_path / "w.pt", tiny(depth=2), "unexpected key 'blocks.2.norm1.weight'")
    assert "(and 11 more)" in message


@pytest.mark.parametrize("spec", ["hf-hub:timm/vit_tiny_patch16_224", "timm/vit_tiny_patch16_224.augreg_in21k",
                                  "vit_tiny_patch16_224", "https://example.com/w.pt"])
def test_hub_names_are_refused(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no file of that name is found
    message = one_line_error(spec, tiny(), "downloads nothing at run time")
    assert spec in message


def test_a_missing_path_is_one_line(tmp_path):
    one_line_error(tmp_path / "nope" / "w.pt", tiny(), "no such file or directory")


def test_not_weights_is_refused(tmp_path):
    save({"epoch": 3, "lr": 0.1}, tmp_path / "w.pt")
    one_line_error(tmp_path / "w.pt", tiny(), "expected a state_dict")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    one_line_error(tmp_path / "junk.pt", tiny(), "not a PyTorch weights file")


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name", ["w.pt", "state.pt"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    save({"model": tiny().state_dict(), "x": Hostile(marker)}, tmp_path / name)
    message = one_line_error(tmp_path / name, tiny(), "not a PyTorch weights file")
    assert "mkdir" in message
    assert not marker.exists()
