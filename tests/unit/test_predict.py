"""Prediction on a model in memory: class names, wnids, probabilities (no training needed)."""

import pytest

from tests.support.data import jpeg_bytes
from vitlab.deploy.bundle import ModelBundle
from vitlab.deploy.predict import predict
from vitlab.errors import UserError
from vitlab.model import create_model


def test_predict_names_classes_and_wnids(tmp_path):
    model = create_model("vit_tiny_patch16_224", 2, dict(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                                         num_heads=2)).eval()
    bundle = ModelBundle(source="test", classes=["tench", "goldfish"], wnids=["n01440764", "n01443537"],
                         image_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
                         model=model)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0, 0, (30, 20)))
    report = predict(bundle, [str(tmp_path / "x.jpg")], top_k=5)
    top = report["results"][0]["top_k"]
    assert len(top) == 2 and {(t["class"], t["wnid"]) for t in top} == {("tench", "n01440764"),
                                                                      ("goldfish", "n01443537")}
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="no image could be read"):
        predict(bundle, [str(tmp_path / "nope.jpg")])
