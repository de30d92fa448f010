"""Models come from timm by name; ``timm.create_model`` is the only door. Nothing is downloaded."""

from __future__ import annotations

from typing import Any

from vitlab.config import JobConfig

# Model families whose constructor takes img_size: it follows data.image_size unless given explicitly.
_IMG_SIZE_FAMILIES = ("vit", "deit", "eva", "beit", "cait", "xcit", "swin")


def with_img_size(name: str, kwargs: dict[str, Any], image_size: int) -> dict[str, Any]:
    """``kwargs`` plus ``img_size`` for the families whose position embedding is sized at build time."""
    kwargs = dict(kwargs)
    if "img_size" not in kwargs and name.startswith(_IMG_SIZE_FAMILIES):
        kwargs["img_size"] = image_size
    return kwargs


def timm_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """The kwargs passed to timm.create_model (without num_classes), exactly as used."""
    return with_img_size(cfg.model.name, cfg.model.kwargs, cfg.data.image_size)


def create_model(name: str, num_classes: int, kwargs: dict[str, Any]):
    """A freshly initialised timm model (pretrained weights are never fetched)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def check_model_name(name: str) -> None:
    """Fail early, with close matches, when timm has no model of that name."""
    import difflib

    import timm

    from vitlab.errors import ConfigError

    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"model.name: timm has no model '{name}'{hint}")
