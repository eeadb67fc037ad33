"""A user's own images: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (JPEG/PNG, any size).

Run:    python train.py --config configs/imagefolder.py --config.data.root=ROOT \
            --config.num_classes=<number of class folders> --workdir workdirs/mine
Model:  ViT-S/16 at 224 px from scratch, mean pooling, sin-cos position embedding;
        random resized crop + flip for training, resize to 224/0.875 and central
        crop for evaluation, inputs normalised to [-1, 1]. Unreadable files are
        skipped with one warning that counts them (data.on_corrupt="error" fails instead).
Result: none recorded: it depends on your data. The test suite trains it for a few
        steps on a generated folder of PNGs and JPEGs.
"""

from jaxvit.training.configs import base_config, model_config


def get_config():
    c = base_config()
    c.dataset = "imagefolder"
    c.data.root = ""
    c.data.crop_fraction = 0.875
    c.image_size = 224
    c.num_channels = 3
    c.num_classes = 2
    c.model = model_config(
        "S/16",
        pool="gap",
        class_token=False,
        posemb="sincos2d",
        scan=True,
        remat_policy="dots_with_no_batch_dims_saveable",  # less memory; faster on CPU too
    )
    c.augment.random_resized_crop = True
    c.augment.flip = True
    c.batch_size = 64
    c.total_steps = 5000
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 500
    c.data.workers = 2
    return c
