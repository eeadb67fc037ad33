"""Classify images with a checkpoint: ``python -m jaxvit.predict --checkpoint PATH IMAGES_OR_DIRS...``.

The checkpoint is anything ``jaxvit.load_for_inference`` reads: a VT/AugReg
or big_vision ``.npz``, a timm state dict, a Hugging Face ViT folder, or a
training workdir. Images are prepared the way the checkpoint's origin
expects (``jaxvit.checkpoints.inference.PREPROCESSING``), run in batches, and the top-5
classes are printed per image (``--json`` for one JSON document).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.checkpoints.inference import InferenceBundle, load_for_inference, read_labels
from jaxvit.data import naflex
from jaxvit.data.preprocess import find_images, preprocess_files


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` probabilities -> ``(indices, probabilities)``, each ``(N, min(k, C))``, best first."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def predict(
    bundle: InferenceBundle,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    k: int = 5,
    max_patches: int | None = None,
) -> list[dict]:
    """Image files -> one ``{"image", "top_k": [{"class", "label", "probability"}...]}`` per image.

    A NaFlex model (``posemb_grid``) takes each image at its aspect ratio, resized to at most
    ``max_patches`` patches (default: its table's count; ``jaxvit.data.naflex``)."""
    if not bundle.model.num_classes:
        raise ValueError("the checkpoint has no classifier (num_classes=0): nothing to predict")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    labels = bundle.labels or tuple(f"class_{i}" for i in range(bundle.model.num_classes))
    if len(labels) != bundle.model.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {bundle.model.num_classes} classes")
    naflex_budget = (
        naflex.budget_of(bundle.model, max_patches) if bundle.model.posemb_grid or max_patches else None
    )

    def probabilities(params, x):
        if naflex_budget is None:
            return jax.nn.softmax(bundle.model.apply({"params": params}, x), axis=-1)
        logits = bundle.model.apply({"params": params}, x["patches"], grids=x["grids"], mask=x["mask"])
        return jax.nn.softmax(logits, axis=-1)

    apply = jax.jit(probabilities)
    results = []
    batch = min(batch_size, len(paths))
    for start in range(0, len(paths), batch):
        chunk = list(paths[start : start + batch])
        if naflex_budget is None:
            inputs = preprocess_files(chunk, bundle)
        else:
            inputs = naflex.prepare_files(chunk, bundle, naflex_budget)
        # Pad the last batch to the same shape, so it reuses the compiled function.
        missing = batch - len(chunk)
        padded = jax.tree_util.tree_map(
            lambda a, m=missing: np.concatenate([a, np.zeros((m, *a.shape[1:]), a.dtype)]), inputs
        )
        if naflex_budget is not None:
            padded["grids"][len(chunk) :] = 1  # the padding rows: a one-patch image, not an empty one
        probs = np.asarray(apply(bundle.params, jax.tree_util.tree_map(jnp.asarray, padded)))[: len(chunk)]
        if not np.isfinite(probs).all():
            bad = [str(p) for p, row in zip(chunk, probs, strict=True) if not np.isfinite(row).all()]
            raise ValueError(f"the model's outputs are not finite (NaN or inf) for {', '.join(bad[:5])}")
        indices, values = top_k(probs, k)
        for path, idx, val in zip(chunk, indices, values, strict=True):
            top = [
                {"class": int(i), "label": labels[int(i)], "probability": float(p)}
                for i, p in zip(idx, val, strict=True)
            ]
            results.append({"image": str(path), "top_k": top})
    return results


def format_text(results: Sequence[dict]) -> str:
    """Human-readable lines: the image, then ``probability  label (class)`` per rank."""
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {t['probability']:.4f}  {t['label']} ({t['class']})" for t in r["top_k"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxvit.predict", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=".npz, timm .safetensors/.pth, timm/HF/open_clip folder, hf-hub:ORG/NAME[@REV] or workdir",
    )
    parser.add_argument("--labels", help="class names, one per line, in class-index order")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--num-heads", type=int, help="for timm files that do not say their head count")
    parser.add_argument(
        "--checkpoint-grid", type=int, nargs=2, metavar=("H", "W"), help="for files whose grid reads two ways"
    )
    parser.add_argument("--activation", help="for a bare timm CLIP tower: quick_gelu or gelu")
    parser.add_argument(
        "--max-patches",
        type=int,
        help="NaFlex checkpoints: the patch budget per image (default: the table's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 1 with a message on stderr)."""
    args = parse_args(argv)
    try:
        paths = find_images(args.images)
        overrides = {"num_heads": args.num_heads} if args.num_heads else {}
        if args.activation:
            overrides["activation"] = args.activation
        grid = tuple(args.checkpoint_grid) if args.checkpoint_grid else None
        bundle = load_for_inference(args.checkpoint, args.image_size, checkpoint_grid=grid, **overrides)
        if args.labels:
            labels = read_labels(args.labels)
            if len(labels) != bundle.model.num_classes:
                raise ValueError(
                    f"{args.labels} has {len(labels)} labels but the model has {bundle.model.num_classes} classes"
                )
            bundle = dataclasses.replace(bundle, labels=labels)
        results = predict(bundle, paths, args.batch_size, args.top_k, args.max_patches)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as train.py, visualize and summary: bad input, not a crash
    print(json.dumps(results, indent=2) if args.json else format_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
