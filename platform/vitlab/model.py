"""Models come from timm by name; ``timm.create_model`` is the only door. Nothing is downloaded.

timm (and with it torch) is imported inside the functions: the CLI and the config checks import this module
without paying for torch.
"""

from __future__ import annotations

import difflib
from typing import Any

from vitlab.config import JobConfig
from vitlab.errors import ConfigError, UserError

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


def build(cfg: JobConfig, num_classes: int):
    """The job's model, freshly initialised."""
    return create_model(cfg.model.name, num_classes, timm_kwargs(cfg))


def check_model_name(name: str) -> None:
    """Fail early, with close matches, when timm has no model of that name."""
    import timm

    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"model.name: timm has no model '{name}'{hint}")


def check_buildable(cfg: JobConfig, num_classes: int) -> None:
    """Build the model once on the meta device (no memory, no compute): bad kwargs fail before Ray."""
    import torch

    check_model_name(cfg.model.name)
    try:
        with torch.device("meta"):
            build(cfg, num_classes)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"model.kwargs: timm cannot build {cfg.model.name} with {timm_kwargs(cfg)}: {e}") from None


def head_classes(cfg: JobConfig, state_dict: dict[str, Any]) -> int:
    """The number of classes a state_dict was trained for, from its classifier's bias or weight."""
    import torch

    with torch.device("meta"):
        probe = build(cfg, 1)
    name = probe.pretrained_cfg.get("classifier", "head")
    for key in (f"{name}.bias", f"{name}.weight", f"{name}.fc.bias"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise UserError(f"cannot tell the number of classes: no '{name}' classifier in the weights")


def with_weights(cfg: JobConfig, num_classes: int, state_dict: dict[str, Any], source: str):
    """The job's model with these weights (strict), in eval mode; weights that do not fit are one line."""
    model = build(cfg, num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{source}: the weights do not fit {cfg.model.name} {timm_kwargs(cfg)} "
                        f"with {num_classes} classes ({' '.join(first[:2])[:300]})") from None
    return model.eval()
