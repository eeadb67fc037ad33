"""tests/configs/tiny.py as a NaFlex run: patch sequences of 4, 9 or 16 patches per step.

Run:    python train.py --config tests/configs/tiny_naflex.py --workdir /tmp/tiny_naflex
Result: not meant to learn; the tests compare its parameters across devices and processes and
        count the step's compiles (one per sequence length).
"""

from jaxvit.training.configs import base_config, model_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    c.image_size = 8
    c.num_channels = 1
    c.num_classes = 10
    c.model = model_config(
        "mu/2", width=16, depth=2, mlp_dim=32, num_heads=2, dropout=0.1, drop_path_rate=0.1, posemb_grid=4
    )
    c.augment.flip = True
    c.label_smoothing = 0.1
    # 16 sequences of 16 patches, 24 of 9 (28 rounded down to a multiple of 8 devices), 64 of 4
    c.naflex.seq_lens = (4, 9, 16)
    c.naflex.max_tokens = 16 * 16
    c.naflex.batch_multiple = 8  # the same batches on 1, 2 and 8 devices
    c.batch_size = 16  # evaluation's batch
    c.total_steps = 12
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 2
    c.log_every = 2
    c.eval_every = 6
    c.checkpoint_every = 4
    c.progress_bar = False
    return c
