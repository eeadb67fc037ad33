"""Default: a small ViT on scikit-learn's bundled 8x8 digits (no download).

Run:    python train.py                  (the same as --config configs/default.py)
Data:   1,797 digits, stratified 80/20 split fixed by data.split_seed; the 360
        test images are never trained on. Random shifts of up to one pixel.
Model:  width 64, depth 4, 4 heads, patch 2 -> 16 tokens, learned position
        embedding, mean pooling (no class token), 136,010 parameters.
Result: 99.2% test accuracy (seed 0) after 4,000 steps, 84 s of training (114 s
        wall with the install, fresh clone and venv) on a 2-core Intel Xeon CPU
        (jax 0.10.2, CPU backend), 2026-11-26; in bf16 compute
        (--config.model.dtype=bfloat16): 98.1%, 84 s (97.2-99.4% over seeds 0-2).
"""

from jaxvit.training.configs import base_config, model_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    c.image_size = 8
    c.num_channels = 1
    c.num_classes = 10
    c.model = model_config("mu/2", width=64, depth=4, mlp_dim=128, num_heads=4, pool="gap", class_token=False)
    c.augment.crop_padding = 1
    c.label_smoothing = 0.1
    c.batch_size = 64
    c.total_steps = 4000
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 100
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
