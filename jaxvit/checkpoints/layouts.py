"""Parameter names and array layouts of the peers, mapped to jaxvit's.

Every layout is a table of ``Rule(src, dst, transform)``: ``src`` is the
checkpoint's key, ``dst`` the jaxvit key (``/``-joined, unrolled blocks), both
templates where ``{i}`` stands for a block index. The same table serves both
directions (``rename`` into jaxvit, ``rename_back`` out of it).

Attention weights need one more step because the peers split them
differently: ``fuse_attention`` turns the separate query/key/value
projections into jaxvit's fused ``qkv`` (output order ``(3, heads,
head_dim)``) and gives the MAP head flax's ``(D, heads, head_dim)`` kernels;
``split_attention`` undoes it for export.

All functions here are pure: dicts of NumPy arrays in, dicts out.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from jaxvit.checkpoints.checkpoint import Checkpoint, Flat

# transform name -> (into jaxvit, back out)
_TRANSFORMS = {
    "id": (lambda a: a, lambda a: a),
    # torch Linear weight (out, in) <-> flax kernel (in, out)
    "linear": (lambda a: a.T, lambda a: a.T),
    # torch Conv2d weight OIHW <-> flax conv kernel HWIO
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # a vector (D,) <-> a token (1, 1, D): CLIP's class_embedding
    "token": (lambda a: a.reshape(1, 1, -1), lambda a: a.reshape(-1)),
    # an nn.Embedding table (T, D) <-> a position embedding (1, T, D)
    "table": (lambda a: a[None], lambda a: a[0]),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``src`` (checkpoint key) <-> ``dst`` (jaxvit key); ``{i}`` matches a block index."""

    src: str
    dst: str
    transform: str = "id"


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


@functools.cache
def _compiled(rules: tuple[Rule, ...]) -> tuple[tuple[re.Pattern[str], re.Pattern[str], Rule], ...]:
    return tuple((_template_regex(r.src), _template_regex(r.dst), r) for r in rules)


def _apply(key: str, table, forward: bool) -> tuple[str, Rule] | None:
    for src_re, dst_re, rule in table:
        match = (src_re if forward else dst_re).fullmatch(key)
        if match:
            index = match.groupdict().get("i")
            target = rule.dst if forward else rule.src
            return target.format(i=index) if index is not None else target, rule
    return None


def rename(flat: Mapping[str, np.ndarray], rules: tuple[Rule, ...]) -> tuple[Flat, Flat]:
    """Checkpoint keys -> jaxvit keys. Returns ``(renamed, unmatched)``; unmatched keep their names."""
    table = _compiled(rules)
    out: Flat = {}
    unmatched: Flat = {}
    for key, value in flat.items():
        hit = _apply(key, table, forward=True)
        if hit is None:
            unmatched[key] = value
            continue
        new_key, rule = hit
        if new_key in out:
            raise ValueError(f"checkpoint keys map twice onto {new_key!r} (second one: {key!r})")
        out[new_key] = _TRANSFORMS[rule.transform][0](value)
    return out, unmatched


def rename_back(flat: Mapping[str, np.ndarray], rules: tuple[Rule, ...], layout: str) -> Flat:
    """jaxvit keys -> checkpoint keys; the first rule naming a jaxvit key wins.

    Raises ``ValueError`` naming the keys this layout has no place for.
    """
    table = _compiled(rules)
    out: Flat = {}
    missing = []
    for key, value in flat.items():
        hit = _apply(key, table, forward=False)
        if hit is None:
            missing.append(f"{key} {tuple(np.shape(value))}")
            continue
        new_key, rule = hit
        out[new_key] = np.ascontiguousarray(_TRANSFORMS[rule.transform][1](value))
    if missing:
        raise ValueError(f"the {layout} layout has no place for these parameters: {', '.join(missing)}")
    return out


# ---------------------------------------------------------------------------
# Rule tables
# ---------------------------------------------------------------------------


def flax_rules(src: str, dst: str, names: Iterable[str] = ("kernel", "bias")) -> list[Rule]:
    return [Rule(f"{src}/{n}", f"{dst}/{n}") for n in names]


def flax_block_rules(src: str, dst: str, sub: Mapping[str, str]) -> list[Rule]:
    """One flax encoder block; ``sub`` names the block's children in the checkpoint."""
    rules = flax_rules(f"{src}/{sub['norm1']}", f"{dst}/norm1", ("scale", "bias"))
    for n in ("query", "key", "value", "out"):
        rules += flax_rules(f"{src}/{sub['attn']}/{n}", f"{dst}/attn/{n}")
    rules += flax_rules(f"{src}/{sub['norm2']}", f"{dst}/norm2", ("scale", "bias"))
    rules += flax_rules(f"{src}/{sub['mlp']}/Dense_0", f"{dst}/mlp/fc1")
    rules += flax_rules(f"{src}/{sub['mlp']}/Dense_1", f"{dst}/mlp/fc2")
    return rules


def flax_map_head_rules(src: str) -> list[Rule]:
    rules = [Rule(f"{src}/probe", "head/map/probe")]
    for n in ("query", "key", "value", "out"):
        rules += flax_rules(f"{src}/MultiHeadDotProductAttention_0/{n}", f"head/map/attn/{n}")
    rules += flax_rules(f"{src}/LayerNorm_0", "head/map/norm", ("scale", "bias"))
    rules += flax_rules(f"{src}/MlpBlock_0/Dense_0", "head/map/mlp/fc1")
    rules += flax_rules(f"{src}/MlpBlock_0/Dense_1", "head/map/mlp/fc2")
    return rules


def flax_vit_rules(posemb_key: str, block_sub: Mapping[str, str]) -> tuple[Rule, ...]:
    return tuple(
        flax_rules("embedding", "patch_embed")
        + [Rule("cls", "cls_token/token"), Rule(posemb_key, "pos_embed/embedding")]
        + flax_block_rules("Transformer/encoderblock_{i}", "encoder/block_{i}", block_sub)
        + flax_rules("Transformer/encoder_norm", "encoder/norm", ("scale", "bias"))
        + flax_rules("pre_logits", "head/pre_logits")
        + flax_rules("head", "head/classifier")
        + flax_map_head_rules("MAPHead_0")
    )


def torch_rules(src: str, dst: str, kind: str) -> list[Rule]:
    if kind == "ln":
        return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]
    return [Rule(f"{src}.weight", f"{dst}/kernel", kind), Rule(f"{src}.bias", f"{dst}/bias")]


def torch_block_rules(src: str, names: Mapping[str, str]) -> list[Rule]:
    dst = "encoder/block_{i}"
    rules: list[Rule] = []
    for ours, kind in (
        ("norm1", "ln"),
        ("attn/qkv", "linear"),
        ("attn/query", "linear"),
        ("attn/key", "linear"),
        ("attn/value", "linear"),
        ("attn/out", "linear"),
        ("norm2", "ln"),
        ("mlp/fc1", "linear"),
        ("mlp/fc2", "linear"),
    ):
        if ours in names:
            rules += torch_rules(f"{src}.{names[ours]}", f"{dst}/{ours}", kind)
    return rules


def torch_mha_rules(src: str, dst: str) -> list[Rule]:
    """torch's ``nn.MultiheadAttention`` at ``src`` -> flax's ``MultiHeadDotProductAttention`` at
    ``dst``, with flat kernels (``mha_heads`` shapes them). torch stacks the q, k, v weights in one
    ``in_proj_weight`` when keys and values have the queries' width, else keeps three
    ``{q,k,v}_proj_weight``; the bias is always stacked."""
    separate = [
        Rule(f"{src}.{x}_proj_weight", f"{dst}/{name}/kernel", "linear")
        for x, name in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    stacked = [
        Rule(f"{src}.in_proj_weight", f"{dst}/qkv/kernel", "linear"),
        Rule(f"{src}.in_proj_bias", f"{dst}/qkv/bias"),
    ]
    return stacked + separate + torch_rules(f"{src}.out_proj", f"{dst}/out", "linear")


def mha_heads(flat: Mapping[str, np.ndarray], dst: str, heads: int) -> Flat:
    """The attention that ``torch_mha_rules`` read to ``dst``, in flax's shapes: ``query``, ``key``,
    ``value`` ``(in, heads, head_dim)`` (a stacked ``qkv`` split first), ``out`` ``(heads,
    head_dim, out)``. Shapes that do not split are left as they are, for the key check to name."""
    out = dict(flat)
    for n in ("kernel", "bias"):
        stacked = out.get(f"{dst}/qkv/{n}")
        if stacked is not None and stacked.shape[-1] % 3 == 0:
            del out[f"{dst}/qkv/{n}"]
            for name, part in zip(("query", "key", "value"), np.split(stacked, 3, axis=-1), strict=True):
                out[f"{dst}/{name}/{n}"] = part
    _split_heads(out, dst, heads)
    return out


def _split_heads(out: Flat, dst: str, heads: int) -> None:
    """Flat ``query``/``key``/``value`` kernels ``(in, H*Dh)`` and biases of the attention at ``dst``
    -> ``(in, H, Dh)`` / ``(H, Dh)``, ``out`` ``(H*Dh, D)`` -> ``(H, Dh, D)``, in place; shapes that
    do not split are left for the key check to name."""
    for name in ("query", "key", "value"):
        kernel, bias = out.get(f"{dst}/{name}/kernel"), out.get(f"{dst}/{name}/bias")
        if kernel is not None and kernel.ndim == 2 and kernel.shape[1] % heads == 0:
            out[f"{dst}/{name}/kernel"] = kernel.reshape(kernel.shape[0], heads, -1)
        if bias is not None and bias.ndim == 1 and bias.shape[0] % heads == 0:
            out[f"{dst}/{name}/bias"] = bias.reshape(heads, -1)
    kernel = out.get(f"{dst}/out/kernel")
    if kernel is not None and kernel.ndim == 2 and kernel.shape[0] % heads == 0:
        out[f"{dst}/out/kernel"] = kernel.reshape(heads, -1, kernel.shape[1])


def flax_checkpoint(
    path: Path, origin: str, arrays: Flat, rules: tuple[Rule, ...], num_prefix_tokens: int
) -> Checkpoint:
    """A flax ``.npz``'s arrays (unrolled blocks) renamed by ``rules`` into a ``Checkpoint``."""
    params, unmatched = rename(arrays, rules)
    if "patch_embed/kernel" not in params:
        raise ValueError(
            f"{path} is an .npz without 'embedding/kernel' (nor under 'params/'): not a ViT checkpoint"
            f" of google-research/vision_transformer or big_vision. Its first keys: {sorted(arrays)[:5]}"
        )
    query = params.get("encoder/block_0/attn/query/kernel")
    return Checkpoint(
        path=str(path),
        origin=origin,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=num_prefix_tokens,
        num_heads=int(query.shape[1]) if query is not None and query.ndim == 3 else None,
    )


# The encoder of timm's ViTs (VisionTransformer and DINOv3's Eva alike): blocks under
# blocks.{i} with a fused qkv, and a final norm.
TIMM_ENCODER_RULES: list[Rule] = torch_block_rules(
    "blocks.{i}",
    {
        "norm1": "norm1",
        "attn/qkv": "attn.qkv",
        "attn/out": "attn.proj",
        "norm2": "norm2",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    },
) + torch_rules("norm", "encoder/norm", "ln")


# timm's AttentionPoolLatent (its ViT's and Eva's global_pool="map"): jaxvit's MAP head.
TIMM_ATTN_POOL_RULES: list[Rule] = (
    [Rule("attn_pool.latent", "head/map/probe")]
    + torch_rules("attn_pool.q", "head/map/attn/query", "linear")
    + torch_rules("attn_pool.kv", "head/map/attn/kv", "linear")
    + torch_rules("attn_pool.proj", "head/map/attn/out", "linear")
    + torch_rules("attn_pool.norm", "head/map/norm", "ln")
    + torch_rules("attn_pool.mlp.fc1", "head/map/mlp/fc1", "linear")
    + torch_rules("attn_pool.mlp.fc2", "head/map/mlp/fc2", "linear")
)


# The encoder of transformers' CLIP-style vision towers (CLIP, SigLIP): blocks under
# encoder.layers.{i} and a final post_layernorm.
CLIP_ENCODER_RULES: list[Rule] = torch_block_rules(
    "encoder.layers.{i}",
    {
        "norm1": "layer_norm1",
        "attn/query": "self_attn.q_proj",
        "attn/key": "self_attn.k_proj",
        "attn/value": "self_attn.v_proj",
        "attn/out": "self_attn.out_proj",
        "norm2": "layer_norm2",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    },
) + torch_rules("post_layernorm", "encoder/norm", "ln")


def image_tower(arrays: Mapping[str, np.ndarray], keep: Iterable[str] = ()) -> tuple[Flat, int]:
    """The image tower of a transformers CLIP-style state dict, without its ``vision_model.`` prefix.

    A two-tower file (``CLIPModel``, ``SiglipModel``) also holds the text
    tower and ``logit_scale``: only the ``vision_model.`` keys and those named
    in ``keep`` (e.g. CLIP's ``visual_projection.weight``) are kept. The
    ``position_ids`` buffer some transformers versions saved is dropped.
    Returns ``(arrays, how many entries were left out)``.
    """
    tower = "vision_model."
    has_tower = any(k.startswith(tower) for k in arrays)
    kept: Flat = {}
    for key, value in arrays.items():
        if key.startswith(tower):
            key = key[len(tower) :]
        elif has_tower and key not in keep:
            continue
        if key != "embeddings.position_ids":
            kept[key] = value
    return kept, len(arrays) - len(kept)


# Why some checkpoint keys have no jaxvit counterpart; shown with the error.
UNSUPPORTED_HINTS = {
    "fc_norm": "a LayerNorm after the pooling instead of before it (timm's fc_norm): the model needs"
    " fc_norm=True",
    "reg_token": "register tokens are not part of jaxvit's model",
    ".ls1.": "LayerScale is not part of jaxvit's model",
    ".ls2.": "LayerScale is not part of jaxvit's model",
    "q_norm": "QK-norm is not part of jaxvit's model",
}


# ---------------------------------------------------------------------------
# Attention: fuse on the way in, split on the way out
# ---------------------------------------------------------------------------

_BLOCK_ATTN = re.compile(r"(encoder/block_\d+/attn)/query/kernel")


_TIMM_QKV = re.compile(r"(blocks\.\d+\.attn)\.qkv\.weight")


def fuse_q_v_biases(arrays: Mapping[str, np.ndarray]) -> Flat:
    """timm's ``q_bias`` + a zero key bias + ``v_bias`` (or all zeros without them) -> one
    ``qkv.bias`` (``Eva``, BEiT: their key has no bias)."""
    out = dict(arrays)
    for key in arrays:
        match = _TIMM_QKV.fullmatch(key)
        if not match or f"{match.group(1)}.qkv.bias" in out:
            continue
        attn, width = match.group(1), arrays[key].shape[0] // 3
        zeros = np.zeros((width,), arrays[key].dtype)
        parts = (out.pop(f"{attn}.q_bias", zeros), zeros, out.pop(f"{attn}.v_bias", zeros))
        out[f"{attn}.qkv.bias"] = np.concatenate(parts)
    return out


_TIMM_GATE = re.compile(r"(blocks\.\d+\.mlp)\.fc1_g\.(weight|bias)")
_TIMM_QUERY = re.compile(r"(blocks\.\d+\.attn)\.q_proj\.weight")


def pack_swiglu(arrays: Mapping[str, np.ndarray]) -> Flat:
    """timm's SwiGLU with separate ``fc1_g`` (gate) and ``fc1_x`` -> one ``fc1``, gate first, as
    jaxvit's ``SwiGLUMlp`` packs them (timm's ``Eva``: DINOv3, EVA02)."""
    out = dict(arrays)
    for key in arrays:
        match = _TIMM_GATE.fullmatch(key)
        if match:
            value = f"{match.group(1)}.fc1_x.{match.group(2)}"
            out[f"{match.group(1)}.fc1.{match.group(2)}"] = np.concatenate([out.pop(key), out.pop(value)])
    return out


def unpack_swiglu(arrays: Mapping[str, np.ndarray]) -> Flat:
    """The inverse of ``pack_swiglu``: each packed ``mlp.fc1`` -> ``fc1_g`` and ``fc1_x``."""
    out = dict(arrays)
    for key in [k for k in arrays if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.(weight|bias)", k)]:
        mlp, kind = key.rsplit(".fc1.", 1)
        out[f"{mlp}.fc1_g.{kind}"], out[f"{mlp}.fc1_x.{kind}"] = np.split(out.pop(key), 2)
    return out


def fuse_qkv_projections(arrays: Mapping[str, np.ndarray]) -> Flat:
    """timm's separate ``q_proj``, ``k_proj``, ``v_proj`` (``Eva`` with ``qkv_fused=False``: EVA02-B
    and -L) -> one ``qkv``; a projection without a bias (EVA's key) adds zeros."""
    out = dict(arrays)
    for key in arrays:
        match = _TIMM_QUERY.fullmatch(key)
        if not match:
            continue
        attn = match.group(1)
        names = [f"{attn}.{p}_proj" for p in "qkv"]
        kernels = [out.pop(f"{n}.weight") for n in names]
        out[f"{attn}.qkv.weight"] = np.concatenate(kernels)
        if any(f"{n}.bias" in out for n in names):
            zeros = [np.zeros((k.shape[0],), k.dtype) for k in kernels]
            out[f"{attn}.qkv.bias"] = np.concatenate(
                [out.pop(f"{n}.bias", z) for n, z in zip(names, zeros, strict=True)]
            )
    return out


def split_qkv_projections(arrays: Mapping[str, np.ndarray]) -> Flat:
    """The inverse of ``fuse_qkv_projections``: each ``qkv`` -> ``q_proj``, ``k_proj``, ``v_proj``."""
    out = dict(arrays)
    for key in [k for k in arrays if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.(weight|bias)", k)]:
        attn, kind = key.rsplit(".qkv.", 1)
        for part, value in zip("qkv", np.split(out.pop(key), 3), strict=True):
            out[f"{attn}.{part}_proj.{kind}"] = value
    return out


def nonzero_key_biases(flat: Mapping[str, np.ndarray], width: int) -> list[str]:
    """The fused ``qkv`` biases (jaxvit's names) whose key part is not zero: what a layout without a
    key bias (BEiT, timm's ``Eva``) cannot hold."""
    return [k for k, v in flat.items() if k.endswith("/attn/qkv/bias") and np.any(v[width : 2 * width])]


def split_q_v_biases(arrays: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
    """The inverse of ``fuse_q_v_biases``: each ``qkv.bias`` -> ``q_bias``, ``v_bias``; and the
    keys whose key part is not zero (which such a layout cannot hold)."""
    out, nonzero = dict(arrays), []
    for key in [k for k in arrays if k.endswith(".attn.qkv.bias")]:
        query, key_bias, value = np.split(out.pop(key), 3)
        if np.any(key_bias):
            nonzero.append(key)
        attn = key[: -len(".qkv.bias")]
        out[f"{attn}.q_bias"], out[f"{attn}.v_bias"] = query, value
    return out, nonzero


def fuse_attention(flat: Mapping[str, np.ndarray], num_heads: int, map_heads: int | None = None) -> Flat:
    """Attention weights in any peer form -> jaxvit's shapes (``map_heads``: the MAP head's heads;
    None: ``num_heads``).

    Blocks: ``query/key/value`` kernels ``(D, H, Dh)`` or ``(D, D)`` -> ``qkv``
    ``(D, 3D)`` in ``(3, H, Dh)`` output order; ``out`` ``(H, Dh, D)`` -> ``(D, D)``.
    MAP head: a fused ``kv`` is split, and flat kernels become ``(D, H, Dh)``,
    ``out`` ``(H, Dh, D)``. Incomplete sets are left as they are, so the
    key check names what is missing.
    """
    out = dict(flat)
    for key in list(out):
        match = _BLOCK_ATTN.fullmatch(key)
        if not match:
            continue
        attn = match.group(1)
        kernels = [f"{attn}/{n}/kernel" for n in ("query", "key", "value")]
        biases = [f"{attn}/{n}/bias" for n in ("query", "key", "value")]
        has_bias = [n in out for n in biases]
        if not all(n in out for n in kernels) or any(has_bias) != all(has_bias):
            continue  # attention without biases has none of the three
        q, k, v = (out.pop(n) for n in kernels)
        d = q.shape[0]
        out[f"{attn}/qkv/kernel"] = np.concatenate([a.reshape(d, -1) for a in (q, k, v)], axis=1)
        if all(has_bias):
            out[f"{attn}/qkv/bias"] = np.concatenate([out.pop(n).reshape(-1) for n in biases])
        if f"{attn}/out/kernel" in out:
            o = out[f"{attn}/out/kernel"]
            out[f"{attn}/out/kernel"] = o.reshape(-1, o.shape[-1])

    head = "head/map/attn"
    if f"{head}/kv/kernel" in out and f"{head}/kv/bias" in out:
        kernel, bias = out.pop(f"{head}/kv/kernel"), out.pop(f"{head}/kv/bias")
        out[f"{head}/key/kernel"], out[f"{head}/value/kernel"] = np.split(kernel, 2, axis=1)
        out[f"{head}/key/bias"], out[f"{head}/value/bias"] = np.split(bias, 2)
    _split_heads(out, head, map_heads or num_heads)
    return out


_BLOCK_QKV = re.compile(r"(encoder/block_\d+/attn)/qkv/kernel")


def split_attention(flat: Mapping[str, np.ndarray], num_heads: int, blocks: str, map_head: str) -> Flat:
    """jaxvit's attention shapes -> a peer's; the inverse of ``fuse_attention``.

    ``blocks``: ``"fused"`` keeps ``qkv``; ``"flat"`` gives ``query/key/value``
    ``(D, D)``; ``"heads"`` gives them ``(D, H, Dh)`` with ``out`` ``(H, Dh, D)``.
    ``map_head``: ``"heads"`` keeps flax's shapes; ``"flat"`` gives ``query``,
    ``key``, ``value`` and ``out`` ``(D, D)``; ``"flat_kv"`` the same with a
    fused ``kv`` ``(D, 2D)`` (timm).
    """
    out = dict(flat)
    if blocks != "fused":
        for key in list(out):
            match = _BLOCK_QKV.fullmatch(key)
            if not match:
                continue
            attn = match.group(1)
            kernel, bias = out.pop(f"{attn}/qkv/kernel"), out.pop(f"{attn}/qkv/bias", None)
            d = kernel.shape[0]
            for i, (n, k) in enumerate(
                zip(("query", "key", "value"), np.split(kernel, 3, axis=1), strict=True)
            ):
                out[f"{attn}/{n}/kernel"] = k if blocks == "flat" else k.reshape(d, num_heads, -1)
                if bias is not None:
                    b = np.split(bias, 3)[i]
                    out[f"{attn}/{n}/bias"] = b if blocks == "flat" else b.reshape(num_heads, -1)
            if blocks == "heads":
                o = out[f"{attn}/out/kernel"]
                out[f"{attn}/out/kernel"] = o.reshape(num_heads, -1, o.shape[-1])
    head = "head/map/attn"
    if map_head in ("flat", "flat_kv") and f"{head}/query/kernel" in out:
        for n in ("query", "key", "value"):
            kernel = out[f"{head}/{n}/kernel"]
            out[f"{head}/{n}/kernel"] = kernel.reshape(kernel.shape[0], -1)
            out[f"{head}/{n}/bias"] = out[f"{head}/{n}/bias"].reshape(-1)
        if map_head == "flat_kv":
            k, v = (out.pop(f"{head}/{n}/kernel") for n in ("key", "value"))
            kb, vb = (out.pop(f"{head}/{n}/bias") for n in ("key", "value"))
            out[f"{head}/kv/kernel"] = np.concatenate([k, v], axis=1)
            out[f"{head}/kv/bias"] = np.concatenate([kb, vb])
        o = out[f"{head}/out/kernel"]
        out[f"{head}/out/kernel"] = o.reshape(-1, o.shape[-1])
    return out


def unstack_scanned(flat: Mapping[str, np.ndarray], scanned: str, unrolled: str) -> Flat:
    """Keys under ``scanned`` (leading depth axis) -> one key per block under ``unrolled.format(i=...)``.

    E.g. ``Transformer/encoderblock/LayerNorm_0/scale (12, D)`` ->
    ``Transformer/encoderblock_{i}/LayerNorm_0/scale (D,)`` for ``i < 12``.
    """
    from jaxvit.safety.validate import MAX_DEPTH

    depths = {
        key: np.shape(value)[0] if np.ndim(value) else None
        for key, value in flat.items()
        if key.startswith(scanned + "/")
    }
    if len(set(depths.values())) > 1 or None in depths.values():
        shown = ", ".join(f"{k} {np.shape(flat[k])}" for k in sorted(depths)[:6])
        raise ValueError(f"the scanned arrays under {scanned!r} do not share one leading depth axis: {shown}")
    depth = next(iter(depths.values()), 0)
    if depth > MAX_DEPTH:
        key = next(iter(depths))
        raise ValueError(
            f"{key} {np.shape(flat[key])} stacks {depth} encoder blocks, more than the {MAX_DEPTH} jaxvit reads"
        )
    out: Flat = {}
    for key, value in flat.items():
        if key.startswith(scanned + "/"):
            rest = key[len(scanned) :]
            for i in range(value.shape[0]):
                out[unrolled.format(i=i) + rest] = value[i]
        else:
            out[key] = value
    return out
