"""``model.init_from``: start a job from weights someone already trained (fine-tuning).

The source is a state_dict file, a vitlab ``best_model.pt``, a ``checkpoint_*`` or run directory (local or any
pyarrow-filesystem URI such as s3://), or an MLflow model URI (``runs:/``, ``models:/``). Only the weights are
taken: optimizer and schedule start fresh. The weights are adapted to the job's freshly built model so that
they load with ``strict=True``: the classifier head is reset when the class count differs, the position
embeddings are resampled when the patch grid differs, and any other difference is a one-line UserError naming
the key. Model-hub names are refused: a job downloads nothing at run time, so what it trains from is what the
user has and can hash (``InitWeights.sha256`` goes into the run's records).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch
from timm.layers import resample_abs_pos_embed

from vitlab import tracking
from vitlab.errors import UserError
from vitlab.redact import redact
from vitlab.train import state, storage

EXPECTED = ("expected a state_dict file, a vitlab best_model.pt, checkpoint_* or run directory, local or s3://, "
            "or an MLflow model URI runs:/<id>/model, models:/<name>/<version>")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
WEB_PREFIXES = ("http://", "https://")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class InitWeights:
    source: str  # the spec as given
    sha256: str  # of the weights file that was read
    state_dict: dict[str, torch.Tensor]  # loads with strict=True into the job's model
    notes: list[str] = field(default_factory=list)  # what was adapted, e.g. "head reset (10 -> 7 classes)"


def load_init_weights(spec: str, model, tracking_uri: str | None = None) -> InitWeights:
    """The weights at ``spec``, adapted to ``model`` (the job's freshly built timm model, on CPU)."""
    shown = _shown(spec)
    if spec.startswith(HUB_PREFIXES + WEB_PREFIXES):
        what = "a model-hub name" if spec.startswith(HUB_PREFIXES) else "a web URL"
        raise UserError(f"model.init_from: {shown!r} is {what}; vitlab downloads nothing at run time ({EXPECTED})")
    if tracking.is_mlflow_uri(spec):
        weights, sha256 = _from_mlflow(spec, tracking_uri)
    else:
        location = _weights_file(spec)
        try:
            data = storage.read_bytes(location)
        except OSError as e:
            raise UserError(f"model.init_from: {_shown(location)}: cannot read ({storage.first_line(e)})") from None
        sha256 = hashlib.sha256(data).hexdigest()
        weights = _torch_load(data, _shown(location), checkpoint=storage.basename(location) == state.STATE_FILE)
    state_dict, notes = adapt(_state_dict_of(weights, shown), model, shown)
    return InitWeights(source=spec, sha256=sha256, state_dict=state_dict, notes=notes)


def _shown(location: str) -> str:
    """A location as it may appear in a message: credentials masked, and short enough for one line."""
    text = redact(location)
    return text if len(text) <= 120 else f"{text[:58]}...{text[-58:]}"


def _weights_file(spec: str) -> str:
    """The file to read for a local or URI spec: the file itself, or a checkpoint's state.pt, or a run's
    best_model.pt."""
    if not storage.is_uri(spec) and not Path(spec).exists():
        if "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or spec.endswith(WEIGHT_SUFFIXES):
            raise UserError(f"model.init_from: {_shown(spec)}: no such file or directory ({EXPECTED})")
        # e.g. 'vit_base_patch16_224.augreg_in21k': a name timm would fetch from a hub
        raise UserError(f"model.init_from: {_shown(spec)!r} is no file or directory here and looks like a model-hub "
                        f"name; vitlab downloads nothing at run time ({EXPECTED})")
    try:
        fs, path = storage.filesystem(spec)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            for name in (state.STATE_FILE, storage.BEST_MODEL_FILE):
                if fs.get_file_info(f"{path.rstrip('/')}/{name}").type == pafs.FileType.File:
                    return storage.join(spec, name)
    except UserError as e:  # a URI pyarrow cannot open
        raise UserError(f"model.init_from: {e}") from None
    except OSError as e:  # e.g. object storage without credentials
        raise UserError(f"model.init_from: {_shown(spec)}: cannot read ({storage.first_line(e)})") from None
    if kind == pafs.FileType.Directory:
        raise UserError(f"model.init_from: {_shown(spec)}: a directory without {state.STATE_FILE} or "
                        f"{storage.BEST_MODEL_FILE} ({EXPECTED})")
    if kind == pafs.FileType.NotFound:
        raise UserError(f"model.init_from: {_shown(spec)}: no such file or directory ({EXPECTED})")
    return spec


def _torch_load(data: bytes, shown: str, checkpoint: bool):
    """torch's weights-only unpickler, never a plain unpickle: a crafted file carries data, never code. A
    vitlab checkpoint (state.pt) may hold numpy RNG states, so it gets the allowlist of state.load_state."""
    try:
        with torch.serialization.safe_globals(state.checkpoint_globals() if checkpoint else []):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        # torch's message is many lines and advises turning the weights-only check off; keep the line that says
        # what was refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])
        raise UserError(f"model.init_from {shown}: not a PyTorch weights file, or one holding more than tensors "
                        f"({reason[:150]})") from None


def _from_mlflow(spec: str, tracking_uri: str | None) -> tuple[object, str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.quiet_mlflow()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="vitlab-init-") as tmp:
        try:
            # Downloaded once and loaded from there, so the hash is of exactly the files that were loaded.
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=tmp))
            logged = mlflow.pytorch.load_model(str(local), map_location="cpu")
        except (MlflowException, OSError) as e:
            msg = getattr(e, "message", str(e)).strip().splitlines()[0][:150]
            raise UserError(f"model.init_from: {_shown(spec)}: not found in the MLflow store {_shown(uri)} "
                            f"({msg})") from None
        # A model directory holds metadata (MLmodel, requirements, input examples) and the weights
        # (data/model.pt2 or model.pth): the largest weights file, else the largest file, is what identifies it.
        files = [f for f in local.rglob("*") if f.is_file()]
        weights_files = [f for f in files if f.name.endswith((*WEIGHT_SUFFIXES, ".pt2"))] or files
        largest = max(weights_files, key=lambda f: f.stat().st_size)
        sha256 = hashlib.sha256(largest.read_bytes()).hexdigest()
    return dict(logged.state_dict()), sha256


def _state_dict_of(obj, shown: str) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict, a vitlab checkpoint ({"model": ...}) or a release file ({"state_dict": ...}),
    without the prefixes that DDP and torch.compile wrappers add."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"model.init_from {shown}: expected a state_dict or a checkpoint with a 'model' or "
                        f"'state_dict' entry, found {found}"[:300])
    return {_unwrapped(k): v for k, v in obj.items()}


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def adapt(weights: dict[str, torch.Tensor], model, shown: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``weights`` made to fit ``model``'s state_dict exactly (same keys, shapes and dtypes), and notes saying
    what was changed. Only the head and the position embeddings may change; any other difference is an error."""
    target = model.state_dict()
    weights, notes = dict(weights), []
    classifier = model.pretrained_cfg.get("classifier", "head")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)  # DeiT-distilled has two

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    src_head = {k: v for k, v in weights.items() if is_head(k)}
    dst_head = {k: v for k, v in target.items() if is_head(k)}
    if src_head.keys() != dst_head.keys() or any(v.shape != dst_head[k].shape for k, v in src_head.items()):
        # another class count: the model's own freshly initialised head, as timm does for fine-tuning
        if not src_head:
            notes.append("head reset (no head in the weights)")
        elif not dst_head:
            notes.append("head dropped (the model has no classifier)")
        else:
            notes.append(f"head reset ({_classes(src_head)} -> {_classes(dst_head)} classes)")
        weights = {k: v for k, v in weights.items() if not is_head(k)} | dst_head

    pos = weights.get("pos_embed")
    if pos is not None and "pos_embed" in target and _resamplable(pos, target["pos_embed"], model):
        weights["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size), old_size=[_side(pos, model)] * 2,
            num_prefix_tokens=_prefix_tokens(model), verbose=False)
        old, new = _side(pos, model), _side(target["pos_embed"], model)
        notes.append(f"pos_embed resampled ({old}x{old} -> {new}x{new} patches)")

    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    expected = f"expected weights of {arch} with the job's model.name and model.kwargs"
    problems = [f"{k!r} is missing from the weights" for k in target if k not in weights]
    problems += [f"unexpected key {k!r} in the weights" for k in weights if k not in target]
    problems += [f"{k!r} has shape {list(weights[k].shape)} in the weights, {list(v.shape)} in the model"
                 for k, v in target.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"model.init_from {shown}: {problems[0]}{more} ({expected})")
    # the model's order and dtypes (bf16 release weights into an fp32 model, say)
    return {k: weights[k].to(v.dtype) for k, v in target.items()}, notes


def _prefix_tokens(model) -> int:
    # with no_embed_class the class/register tokens get no position embedding
    return 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens


def _side(pos: torch.Tensor, model) -> int:
    """The side of a position embedding's patch grid, taken to be square."""
    return math.isqrt(max(pos.shape[1] - _prefix_tokens(model), 0))


def _resamplable(pos: torch.Tensor, target: torch.Tensor, model) -> bool:
    """Whether ``pos`` is the same embedding for another patch grid (another image or patch size): a square
    grid of the same width, which timm interpolates as it does when loading pretrained weights. Any other
    difference is left to the shape check."""
    if pos.shape == target.shape or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return False
    side = _side(pos, model)
    return side > 0 and side * side == pos.shape[1] - _prefix_tokens(model)


def _classes(head: dict[str, torch.Tensor]) -> int:
    """The class count of a classifier's tensors: the output rows of its weight (or bias)."""
    return int(next(iter(head.values())).shape[0])
