"""Parameters per module and forward FLOPs of a ViT, without allocating its weights.

::

    python -m jaxvit.summary B/16 [--image-size 384] [--num-classes 10] [--pool gap ...] [--json]

Any field of ``VisionTransformer`` can be overridden as ``--field value``
(``--class-token false``, ``--posemb sincos2d``, ``--width 512``).

FLOPs are given two ways, per image:

* **formula** (``formula_flops``): ``2*m*n*k`` for every matmul of the
  forward pass, one multiply-add being two FLOPs. Counted: the patch
  embedding, each block's ``qkv``, attention logits ``q k^T``, attention times
  values, output projection, ``fc1`` and ``fc2``; the MAP head's query, key,
  value and output projections, its logits and values, and its MLP (on the
  one probe token); the projections, logits and values of CoCa's attentional
  pooler (``pool="attn_pool"``); ``pre_logits`` and the classifier. Not counted:
  LayerNorm, softmax, GELU, bias and residual adds, the position embedding.
* **XLA** (``xla_flops``): what ``jax.jit(...).lower(...).compile().cost_analysis()``
  reports for the compiled forward pass on abstract inputs. It also counts
  the elementwise work the formula leaves out, so it is a few percent higher.

Published "GFLOPs" of ViTs (17.6 for B/16 at 224) are multiply-adds, half
of the formula's FLOPs; both are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import schema
from jaxvit.model import MODEL_FIELDS, VisionTransformer, create_model, param_shapes
from jaxvit.sizes import to_pair

# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


# The order of the forward pass; the parameter tree itself comes sorted by name.
_ORDER = (
    "patch_embed",
    "cls_token",
    "pos_embed",
    "encoder",
    "head",
    "map",
    "attn_pool",
    "pre_logits",
    "classifier",
)


def _module_order(name: str) -> tuple[int, int, str]:
    # block_2 before block_10; the scanned stack, then the final norm, after the blocks.
    if name.startswith("block_") and name[6:].isdigit():
        return (0, int(name[6:]), name)
    if name in ("blocks", "norm"):
        return (1, int(name == "norm"), name)
    return (2, _ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def module_params(shapes: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``[(module, parameter count)]`` in model order: top-level modules, with
    ``encoder`` and ``head`` split into their children (``encoder/block_0``,
    ``encoder/blocks`` when scanned, ``encoder/norm``, ``head/classifier``, ...)."""
    rows = []
    for name in sorted(shapes, key=_module_order):
        subtree = shapes[name]
        if name in ("encoder", "head") and isinstance(subtree, Mapping):
            children = sorted(subtree, key=_module_order)
            rows += [(f"{name}/{child}", _size(subtree[child])) for child in children]
        else:
            rows.append((name, _size(subtree)))
    return rows


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of ``(m, k) @ (k, n)``: ``2*m*n*k`` (a multiply-add is two FLOPs)."""
    return 2 * m * n * k


def block_flops(tokens: int, width: int, mlp_dim: int, mlp_type: str = "mlp") -> dict[str, int]:
    """FLOPs of one encoder block on ``tokens`` tokens, per matmul.

    Attention over all heads together is ``tokens x tokens x width`` for the
    logits and the same for the weighted values, whatever the head count.
    A SwiGLU's ``fc1`` computes gate and value: twice ``mlp_dim`` outputs.
    """
    t, d, m = tokens, width, mlp_dim
    return {
        "qkv": matmul_flops(t, 3 * d, d),
        "attn_logits": matmul_flops(t, t, d),
        "attn_values": matmul_flops(t, d, t),
        "out": matmul_flops(t, d, d),
        "fc1": matmul_flops(t, 2 * m if mlp_type == "swiglu" else m, d),
        "fc2": matmul_flops(t, d, m),
    }


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> int:
    """FLOPs of attention pooling: one probe query over ``tokens`` keys and values, then the MLP on it."""
    t, d, m = tokens, width, mlp_dim
    projections = matmul_flops(1, d, d) + 2 * matmul_flops(t, d, d) + matmul_flops(1, d, d)
    attention = matmul_flops(1, t, d) + matmul_flops(1, d, t)
    return projections + attention + matmul_flops(1, m, d) + matmul_flops(1, d, m)


def attn_pool_flops(tokens: int, width: int, pool_width: int, queries: int) -> int:
    """FLOPs of CoCa's attentional pooler: ``queries`` queries of width ``pool_width`` over ``tokens``
    keys and values of width ``width``, projected to ``pool_width``."""
    t, d, e, q = tokens, width, pool_width, queries
    projections = matmul_flops(q, e, e) + 2 * matmul_flops(t, e, d) + matmul_flops(q, e, e)
    return projections + matmul_flops(q, t, e) + matmul_flops(q, e, t)


def formula_flops(model: VisionTransformer, image_size: int | tuple[int, int] = 224) -> dict[str, int]:
    """``{module: FLOPs}`` of one image's forward pass by the closed form (see the module docstring).

    Keys match ``module_params`` (``patch_embed``, ``encoder/block_i`` or
    ``encoder/blocks``, ``head/map``, ``head/pre_logits``, ``head/classifier``);
    modules without matmuls are left out.
    """
    height, width_px = to_pair(image_size)
    p, q = to_pair(model.patch_size)
    if height % p or width_px % q:
        raise ValueError(f"image size {height}x{width_px} is not divisible by the patch size {p}x{q}")
    patches = (height // p) * (width_px // q)
    tokens = patches + model.num_prefix_tokens  # class, distillation and register tokens
    d = model.width
    mlp_dim = model.mlp_dim or 4 * d
    flops = {"patch_embed": matmul_flops(patches, d, p * q * model.num_channels)}
    per_block = sum(block_flops(tokens, d, mlp_dim, model.mlp_type).values())
    if model.scan:
        flops["encoder/blocks"] = model.depth * per_block
    else:
        flops.update({f"encoder/block_{i}": per_block for i in range(model.depth)})
    features = d
    if model.pool == "map":
        flops["head/map"] = map_head_flops(tokens, d, model.pool_mlp_dim or mlp_dim)
    elif model.pool == "attn_pool":
        features = model.pool_width or d
        flops["head/attn_pool"] = attn_pool_flops(tokens, d, features, model.pool_queries)
    if model.representation_size:
        flops["head/pre_logits"] = matmul_flops(1, model.representation_size, d)
        features = model.representation_size
    if model.num_classes:
        flops["head/classifier"] = matmul_flops(1, model.num_classes, features)
        if model.distill_token:
            flops["head/dist_classifier"] = matmul_flops(1, model.num_classes, features)
    return flops


def xla_flops(model: VisionTransformer, image_size: int | tuple[int, int] = 224) -> float:
    """FLOPs of one image's forward pass as counted by XLA's cost analysis of the compiled function.

    Parameters and image are abstract (``ShapeDtypeStruct``), so nothing is
    allocated; only the compile runs. A scanned model is counted as its
    unrolled twin (the same arithmetic): the cost analysis counts a loop's
    body once, not once per layer.
    """
    if model.scan:
        model = model.clone(scan=False)
    height, width = to_pair(image_size)
    images = jax.ShapeDtypeStruct((1, height, width, model.num_channels), jnp.float32)
    params = param_shapes(model, (height, width))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    cost = forward.lower(params, images).compile().cost_analysis()
    # Older jax returned one dict per device.
    if isinstance(cost, Sequence):
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis gave no 'flops' for this backend")
    return float(cost["flops"])


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    """What ``summarize`` found; ``modules`` is ``[(name, params, formula FLOPs)]`` in model order."""

    model: VisionTransformer
    image_size: tuple[int, int]
    tokens: int
    modules: list[tuple[str, int, int]]
    total_params: int
    formula_flops: int
    xla_flops: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the model's fields, the table and the totals."""
        fields = {
            name: (jnp.dtype(value).name if name in ("dtype", "param_dtype") else value)
            for name in MODEL_FIELDS
            for value in [getattr(self.model, name)]
        }
        return {
            "model": fields,
            "image_size": list(self.image_size),
            "tokens": self.tokens,
            "modules": [{"name": n, "params": p, "formula_flops": f} for n, p, f in self.modules],
            "total_params": self.total_params,
            "formula_flops": self.formula_flops,
            "formula_multiply_adds": self.formula_flops // 2,
            "xla_flops": self.xla_flops,
        }


def summarize(
    model: VisionTransformer, image_size: int | tuple[int, int] = 224, *, xla: bool = True
) -> Summary:
    """Parameters per module, totals, and forward FLOPs per image (formula, and XLA's unless ``xla=False``)."""
    size = to_pair(image_size)
    model.check_config()
    model.patch_grid(jax.ShapeDtypeStruct((1, *size, model.num_channels), jnp.float32))
    params = module_params(param_shapes(model, size))
    flops = formula_flops(model, size)
    names = {name for name, _ in params}
    missing = sorted(set(flops) - names)
    if missing:
        raise RuntimeError(f"FLOPs counted for modules the parameters do not have: {missing}")
    p, q = to_pair(model.patch_size)
    tokens = (size[0] // p) * (size[1] // q) + model.num_prefix_tokens
    return Summary(
        model=model,
        image_size=size,
        tokens=tokens,
        modules=[(name, count, flops.get(name, 0)) for name, count in params],
        total_params=sum(count for _, count in params),
        formula_flops=sum(flops.values()),
        xla_flops=xla_flops(model, size) if xla else None,
    )


def _unit(total: float) -> tuple[str, float]:
    # One unit for the whole table, chosen so the total reads naturally.
    for prefix, scale in (("G", 1e9), ("M", 1e6)):
        if total >= scale:
            return prefix, scale
    return "K", 1e3


def format_table(summary: Summary, title: str = "") -> str:
    """A plain-text table of ``summary``."""
    prefix, scale = _unit(summary.formula_flops)

    def num(x: float) -> str:
        return f"{x / scale:,.3f}"

    rows = [("module", "params", f"{prefix}FLOPs (formula)")]
    depth = summary.model.depth

    def label(name: str) -> str:
        return f"{name} (x{depth})" if name == "encoder/blocks" else name

    rows += [
        (label(name), f"{count:,}", num(flops) if flops else "-") for name, count, flops in summary.modules
    ]
    rows.append(("total", f"{summary.total_params:,}", num(summary.formula_flops)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "  ".join("-" * w for w in widths)

    def line(row: Sequence[str]) -> str:
        return f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"

    h, w = summary.image_size
    out = [f"{title or 'ViT'} at {h}x{w}: {summary.tokens} tokens", "", line(rows[0]), rule]
    out += [line(row) for row in rows[1:-1]] + [rule, line(rows[-1]), ""]
    out.append(
        f"forward FLOPs per image, formula (2*m*n*k over the matmuls): {num(summary.formula_flops)} {prefix}"
        f" = 2 x {num(summary.formula_flops / 2)} {prefix} multiply-adds"
    )
    if summary.xla_flops is not None:
        ratio = summary.xla_flops / summary.formula_flops if summary.formula_flops else float("nan")
        out.append(
            f"forward FLOPs per image, XLA cost analysis (all ops): {num(summary.xla_flops)} {prefix}"
            f" ({ratio:.3f} x formula)"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_image_size(text: str) -> tuple[int, int]:
    """``"224"`` -> ``(224, 224)``; ``"224x160"`` -> ``(224, 160)`` (height x width)."""
    try:
        sides = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise ValueError(f"image size {text!r} must be a positive integer or HxW, e.g. 224 or 224x160")
    return (sides[0], sides[-1])


def _parse_value(field: str, text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if field == "patch_size" and "x" in lowered:
        return parse_image_size(lowered)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--pool", "gap", "--class-token=false"]`` -> ``{"pool": "gap", "class_token": False}``."""
    overrides: dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: model fields are given as --field value")
        name, eq, value = token[2:].partition("=")
        field = name.replace("-", "_")
        if field not in MODEL_FIELDS:
            raise ValueError(f"unknown option {token!r}: model fields are {sorted(MODEL_FIELDS)}")
        if not eq:
            if not tokens:
                raise ValueError(f"{token} needs a value")
            value = tokens.pop(0)
        overrides[field] = _parse_value(field, value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvit.summary",
        description="Parameters per module and forward FLOPs of a ViT. Other --field value options"
        " override VisionTransformer fields (e.g. --pool gap --class-token false).",
    )
    parser.add_argument("variant", help="e.g. B/16, S/32, Ti/16, B/16x8")
    parser.add_argument("--image-size", default="224", help="224 or HxW")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA compile and its FLOP count")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = schema.read_fields(parse_overrides(rest), "command line")
        model = create_model(args.variant, num_classes=args.num_classes, **overrides)
        schema.check_size(model, "command line")
        summary = summarize(model, parse_image_size(args.image_size), xla=not args.no_xla)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(summary.to_dict(), indent=2, default=_json_default) if args.json else None
    print(text or format_table(summary, title=args.variant))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
