"""The fused ONNX graph `vitlab export --optimize` writes: timm's attention exported in the form onnxruntime's
transformer optimizer recognises, then fused by it into com.microsoft ``Attention`` nodes (one per block).

timm's ``Attention`` runs one qkv Linear, a reshape/permute/unbind and ``scaled_dot_product_attention``; traced
to ONNX that matches none of the optimizer's patterns. During export each such block gets a numerically
equivalent forward instead (three Linear projections sliced from the same qkv weight, Reshape + Transpose,
MatMul / Div / Softmax / MatMul): BERT's attention subgraph, which the optimizer (``model_type="vit"``) fuses.
The model itself is left as it was. Only ``Attention`` (and the ``BiasGelu`` onnxruntime also makes by itself)
is fused: the optimizer's SkipLayerNormalization fusion made the graph slower here (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitlab.errors import UserError

# Fused node types whose counts the export report gives (the optimizer's own statistics, non-zero ones).
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def attention_blocks(model) -> list[Any]:
    """timm ViT ``Attention`` modules whose forward can be exported in the fusable form: plain self-attention
    (no qk-norm, no scale-norm, no gate)."""
    from timm.models.vision_transformer import Attention
    from torch import nn

    blocks = []
    for m in model.modules():
        if type(m) is not Attention:
            continue
        plain = [getattr(m, name, None) for name in ("q_norm", "k_norm", "norm")]
        if all(p is None or isinstance(p, nn.Identity) for p in plain) and getattr(m, "gate", None) is None:
            blocks.append(m)
    return blocks


def check_fusable(model) -> list[Any]:
    blocks = attention_blocks(model)
    if not blocks:
        raise UserError(f"--optimize: {type(model).__name__} has no timm ViT attention block onnxruntime can fuse "
                        "(expected timm.models.vision_transformer.Attention); export without --optimize")
    return blocks


def _bert_attention(self, x, attn_mask=None, is_causal=False):
    """timm ``Attention.forward`` in BERT's ONNX form: q, k, v projections apart (k transposed by its
    Transpose), scores divided by sqrt(head_dim), softmax, context, output projection."""
    import torch
    from torch.nn import functional as F

    if attn_mask is not None or is_causal:
        return self._vitlab_forward(x, attn_mask=attn_mask, is_causal=is_causal)
    batch, tokens, _ = x.shape
    heads, dim, width = self.num_heads, self.head_dim, self.attn_dim
    w = self.qkv.weight
    b = self.qkv.bias if self.qkv.bias is not None else w.new_zeros(w.shape[0])

    def project(i: int):
        rows = slice(i * width, (i + 1) * width)
        return F.linear(x, w[rows], b[rows]).reshape(batch, tokens, heads, dim)

    q = project(0).permute(0, 2, 1, 3)
    k = project(1).permute(0, 2, 3, 1)
    v = project(2).permute(0, 2, 1, 3)
    scores = torch.matmul(q, k) / math.sqrt(dim)
    out = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(batch, tokens, width)
    return self.proj(out)


@contextlib.contextmanager
def fusable_attention(model) -> Iterator[list[Any]]:
    """While open, the model's attention blocks run (and trace as) ``_bert_attention``."""
    blocks = check_fusable(model)
    for m in blocks:
        m._vitlab_forward = m.forward
        m.forward = types.MethodType(_bert_attention, m)
    try:
        yield blocks
    finally:
        for m in blocks:
            del m.forward, m._vitlab_forward  # instance attributes: the class's forward is back


def _residual_branch_first(model_proto) -> None:
    """Residual Adds get the branch (a Linear's output) as input 0 and the skip as input 1. The fusion looks for
    the attention output through the first input produced by an Add; in the first block the skip is itself an
    Add (patch tokens + position embedding), and that block would stay unfused. Add commutes: same numbers."""
    producer = {out: n for n in model_proto.graph.node for out in n.output}

    def linear_output(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "Add" and any(
            i in producer and producer[i].op_type == "MatMul" for i in p.input)

    for n in model_proto.graph.node:
        if (n.op_type == "Add" and len(n.input) == 2 and n.input[0] in producer and linear_output(n.input[1])
                and not linear_output(n.input[0])):
            n.input[0], n.input[1] = n.input[1], n.input[0]


def fuse_onnx(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Rewrite the ONNX file at ``path`` in place with onnxruntime's transformer fusions (Python graph rewrite
    only, no onnxruntime pre-optimisation baked in: the file stays portable across CPUs); the fused node
    counts."""
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    proto = onnx.load(str(path))
    _residual_branch_first(proto)
    options = FusionOptions("vit")
    options.enable_skip_layer_norm = False  # measured slower than onnxruntime's own LayerNormalization + Add
    options.enable_bias_skip_layer_norm = False
    with _quiet():
        fused = optimizer.optimize_model(proto, model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                                         optimization_options=options, opt_level=0)
        stats = fused.get_fused_operator_statistics()
        fused.save_model_to_file(str(path))
    return {op: int(stats.get(op, 0)) for op in FUSED_OPS if stats.get(op)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimizer logs its progress (INFO, WARNING) through the root logger's handlers."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
