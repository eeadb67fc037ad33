"""The shared skeleton of every training config (``configs/*.py`` start from ``base_config``),
and the functions that read a config into the objects it describes.

Every config therefore has the same keys, so any ``--config.<key>=<value>``
override works with every file, and an unknown key fails at once.

Batch sizes are **global**: ``batch_size`` is the number of examples in one
train step summed over all devices of all processes. Each process loads
``batch_size / process_count`` and each device holds
``batch_size / device_count``; with ``grad_accum_steps = k`` the optimizer
sees ``k * batch_size`` examples per update.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxvit import schema
from jaxvit.model import VisionTransformer
from jaxvit.training import optim, train_lib

# Model fields set by the variant name unless overridden; None means "from the variant".
_FROM_VARIANT = tuple(n for n, s in schema.SPECS.items() if s.from_variant)
# The config's model section: every schema field but those kept beside the data (num_classes, ...).
_MODEL_SECTION = tuple(n for n, s in schema.SPECS.items() if not s.top_level)


def model_config(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
    """Every model field of the schema as a config entry: the variant, then overrides."""
    fields: dict[str, Any] = {"variant": variant}
    for name in _MODEL_SECTION:
        default = schema.DEFAULTS[name]
        fields[name] = None if name in _FROM_VARIANT else default
        if schema.SPECS[name].kind == "dtype":
            fields[name] = jnp.dtype(default).name
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}: valid fields are {sorted(fields)}")
    fields.update(overrides)
    config = ml_collections.ConfigDict(fields)
    # Variant-sized fields start as None; let the command line give them a number.
    for name in _FROM_VARIANT:
        if config[name] is None:
            config[name] = ml_collections.FieldReference(None, field_type=object)
    return config


def step_config_from_config(config: ml_collections.ConfigDict) -> train_lib.StepConfig:
    """The static settings of ``train_lib.train_step`` (loss, batch mixing, EMA, accumulation)."""
    aug = config.augment
    return train_lib.StepConfig(
        num_classes=config.num_classes,
        label_smoothing=config.label_smoothing,
        mix=train_lib.MixConfig(
            mixup_alpha=aug.mixup_alpha,
            cutmix_alpha=aug.cutmix_alpha,
            switch_prob=aug.switch_prob,
            prob=aug.mix_prob,
        ),
        ema_decay=config.ema_decay,
        grad_accum_steps=config.grad_accum_steps,
        freeze=optim.freeze_patterns(config.get("freeze")),
    )


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float) -> int:
    """The number of train steps that covers ``epochs`` passes over ``num_examples``."""
    return max(1, math.ceil(num_examples * epochs / batch_size))


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every key; a config file changes what it needs and locks the result."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "digits"  # digits | imagefolder | arrayrecord | synthetic | tfds:<name>
    c.image_size = 8  # int or (height, width)
    c.num_channels = 3
    c.num_classes = 10
    c.model = model_config("mu/2")
    c.data = _data_config()
    c.augment = _augment_config()
    c.label_smoothing = 0.0

    c.batch_size = 128  # global, see the module docstring
    c.total_steps = 1000
    c.grad_accum_steps = 1
    c.optimizer = _optimizer_config()
    c.ema_decay = 0.0  # > 0 keeps an EMA of the weights and evaluates it

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # > 1 shards parameters and optimizer state

    c.log_every = 50
    c.eval_every = 500  # 0: only at the end
    c.checkpoint_every = 500  # 0: only at the end and on SIGTERM
    c.max_to_keep = 2
    c.best_metric = "eval/top1"  # "" turns keep-best off
    c.best_mode = "max"
    c.async_checkpointing = True
    c.progress_bar = True

    c.init_from = ""  # a pretrained checkpoint (see jaxvit.load_pretrained) for fine-tuning
    # True: the model is the one init_from was made for (jaxvit.checkpoints.architecture.model_from_checkpoint),
    # with num_classes, num_channels and image_size of this config and TRAINING_FIELDS of c.model
    c.model_from_checkpoint = False
    # parameters that get no update: a regex (or a sequence of them) over parameter paths such as
    # "encoder/block_0/mlp/fc1/kernel", naming a parameter or a module; "backbone" = all but head/
    c.freeze = ml_collections.FieldReference((), field_type=object)
    # FlexiViT: each step cuts the images into patches of a size drawn from this list (ints that
    # divide image_size; the model's own parameters, see VisionTransformer.__call__); () is off
    c.flexi_patch_sizes = ml_collections.FieldReference((), field_type=object)
    # NaFlex (needs model.posemb_grid): each image at its aspect ratio as a patch sequence; each step
    # draws its length from seq_lens and takes max_tokens // length images (jaxvit.data.naflex)
    c.naflex = ml_collections.ConfigDict()
    c.naflex.seq_lens = ml_collections.FieldReference((), field_type=object)  # () is off
    c.naflex.max_tokens = 0  # patches per global batch; 0: batch_size sequences of the longest
    c.naflex.eval_max_patches = 0  # evaluation's budget per image; 0: the longest of seq_lens
    # each step's batch is rounded down to a multiple of this (of the devices, which must divide it);
    # 0: the device count, so that runs on other device counts draw other batches
    c.naflex.batch_multiple = 0
    return c


def _data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.root = ""  # imagefolder: root with <train_split>/ and <val_split>/; arrayrecord: a packed folder
    d.train_split = "train"
    d.val_split = "val"
    d.on_corrupt = "skip"  # skip (warn with a count) | error
    d.test_fraction = 0.2  # digits: held-out share, stratified
    d.split_seed = 0  # digits: fixes the split, independent of c.seed
    d.synthetic_examples = 4096
    d.tfds_data_dir = ""
    d.verify_checksums = True  # arrayrecord: hash every shard before training
    d.mean = (0.5,)  # normalisation: (x / 255 - mean) / std -> [-1, 1]
    d.std = (0.5,)
    d.crop_fraction = 1.0  # eval: keep the central fraction of the shorter side
    d.workers = 0  # grain worker processes (0: load in the main process)
    return d


def _augment_config() -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.random_resized_crop = False
    a.crop_scale = (0.08, 1.0)
    a.crop_padding = 0  # random shift by up to this many pixels
    a.flip = False
    a.randaugment_num_ops = 0
    a.randaugment_magnitude = 10.0
    a.randaugment_prob = 0.5  # each chosen op applied with this probability (timm, big_vision)
    a.mixup_alpha = 0.0
    a.cutmix_alpha = 0.0
    a.mix_prob = 1.0
    a.switch_prob = 0.5
    return a


def _optimizer_config() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.name = "adamw"  # adamw | sgd | lion | adafactor
    o.lr = 1e-3
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.momentum = 0.9  # sgd
    o.nesterov = False  # sgd
    # kernels only; multiplied by the learning rate (optax/PyTorch AdamW), so big_vision's
    # lr-independent wd corresponds to weight_decay = wd / lr; SGD adds it as L2
    o.weight_decay = 1e-4
    o.grad_clip_norm = 1.0  # 0 turns clipping off
    o.schedule = "cosine"  # cosine | linear | constant
    o.warmup_steps = 0
    o.end_factor = 0.0
    # BEiT/timm layer-wise decay: block i learns at lr * layer_decay ** (depth - i), the
    # embeddings at lr * layer_decay ** (depth + 1), the final norm and head at lr; 1 is off
    o.layer_decay = 1.0
    return o


# Model fields that change how a model trains or computes, not its weights: with
# ``model_from_checkpoint`` they come from ``config.model``, everything else from the checkpoint.
TRAINING_FIELDS = schema.names("regularization") + schema.names("compute")


def model_from_init_checkpoint(config: ml_collections.ConfigDict) -> tuple[VisionTransformer, Any]:
    """``(model, checkpoint)`` for ``model_from_checkpoint=True``: the model ``config.init_from`` was
    made for, with the config's ``num_classes``, ``num_channels`` and ``TRAINING_FIELDS``."""
    from jaxvit.checkpoints.architecture import (
        model_from_checkpoint,  # the converters: imported only when used
    )
    from jaxvit.checkpoints.pretrained import read_checkpoint

    if not config.init_from:
        raise ValueError("model_from_checkpoint=True needs init_from=<a pretrained checkpoint>, got ''")
    ckpt = read_checkpoint(config.init_from)
    training = {k: config.model[k] for k in TRAINING_FIELDS}
    for key in ("dtype", "param_dtype"):
        training[key] = jnp.dtype(training[key])
    model, _ = model_from_checkpoint(
        ckpt, num_classes=config.num_classes, num_channels=config.num_channels, **training
    )
    return model, ckpt


def with_model_fields(
    config: ml_collections.ConfigDict, model: VisionTransformer
) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` whose ``model`` block holds every field of ``model`` (no variant),
    so that ``model_from_config`` of it (or of the workdir's ``config.json``) rebuilds ``model``."""
    every = schema.json_fields(model)
    fields: dict[str, Any] = {"variant": None, **{n: every[n] for n in _MODEL_SECTION}}
    as_dict = config.to_dict()
    as_dict["model"] = fields
    resolved = ml_collections.ConfigDict(as_dict)
    resolved.lock()
    return resolved


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of ``config``: ``["augment.flip", ..., "seed"]``."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs a config file's ``get_config()`` (the file is code, as with absl's config flags)."""
    import importlib.util

    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_jaxvit_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_values(config: Any) -> None:
    """Raises ``ValueError`` naming the key for a training config value of the wrong type or range.

    Runs before anything else reads the config, so that a string where an
    int belongs or a zero divisor is a one-line error, not a traceback.
    """
    from jaxvit.safety import validate

    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    where = "config"
    # Ranges of the keys not listed here are checked by trainer.validate_config, with its messages.
    for key, lo in (
        ("seed", None),
        ("num_channels", 1),
        ("num_classes", None),
        ("batch_size", None),
        ("total_steps", None),
        ("grad_accum_steps", 1),
        ("log_every", None),
        ("eval_every", None),
        ("checkpoint_every", None),
        ("max_to_keep", None),
    ):
        if key in values:
            validate.int_field(values, key, where, lo=-(2**63) if lo is None else lo)
    if "image_size" in values:
        validate.size_field(values, "image_size", where)
    data = values.get("data") or {}
    for key in ("mean", "std"):
        if key in data:
            seq = data[key] if isinstance(data[key], (list, tuple)) else [data[key]]
            if not seq or len(seq) not in (1, values.get("num_channels", 3)):
                raise ValueError(
                    f"config: data.{key} has {len(seq)} values {tuple(seq)} but the images have"
                    f" {values.get('num_channels', 3)} channel(s): give 1 or {values.get('num_channels', 3)} values"
                )
            for v in seq:
                validate.float_field(
                    {f"data.{key}": v}, f"data.{key}", where, lo=0.0 if key == "std" else None
                )
    if "crop_fraction" in data:
        validate.float_field(data, "crop_fraction", f"{where}: data", lo=0.0, hi=1.0, lo_open=True)
    if "label_smoothing" in values:
        validate.float_field(values, "label_smoothing", where, lo=0.0, hi=1.0)
    if "ema_decay" in values:
        validate.float_field(values, "ema_decay", where, lo=0.0, hi=1.0)
    if isinstance(values.get("model"), dict):
        schema.read_fields({k: v for k, v in values["model"].items() if v is not None}, f"{where}: model")


def check_overrides(argv: list[str], default_config: str) -> None:
    """Raises ``ValueError`` listing the valid keys if a ``--config.<key>`` names no key of the config."""
    path = default_config
    overrides = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config.") :].split("=", 1)[0])
    if not overrides:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        return
    config = load_config_file(path)
    valid = flat_keys(config)
    valid_set = set(valid) | {k.rsplit(".", 1)[0] for k in valid if "." in k}
    unknown = [key for key in overrides if key not in valid_set]
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {path}; valid keys: {', '.join(valid)}")
