"""A seconds-long run for tests: a 2-block ViT on the digits, 12 steps.

Run:    python train.py --config tests/configs/tiny.py --workdir /tmp/tiny
Result: not meant to learn; the tests compare its parameters across devices,
        processes and interruptions.
"""

from jaxvit.training.configs import base_config, model_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    c.image_size = 8
    c.num_channels = 1
    c.num_classes = 10
    c.model = model_config(
        "mu/4", width=16, depth=2, mlp_dim=32, num_heads=2, dropout=0.1, drop_path_rate=0.1
    )
    c.augment.crop_padding = 1
    c.augment.mixup_alpha = 0.2
    c.label_smoothing = 0.1
    c.batch_size = 16
    c.total_steps = 12
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 2
    c.log_every = 2
    c.eval_every = 6
    c.checkpoint_every = 4
    c.progress_bar = False
    return c
