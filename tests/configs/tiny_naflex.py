"""tests/configs/tiny.py as a NaFlex run: patch sequences of 4, 9 or 16 patches per step.

Run:    python train.py --config tests/configs/tiny_naflex.py --workdir /tmp/tiny_naflex
Result: not meant to learn; the tests compare its parameters across devices and processes and
        count the step's compiles (one per sequence length).
"""

import os

from jaxvit.training.configs import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.model.variant, c.model.posemb_grid = "mu/2", 4  # 2-pixel patches, a 4x4 table
    c.augment.crop_padding, c.augment.mixup_alpha, c.augment.flip = 0, 0.0, True  # NaFlex's crops
    # 16 sequences of 16 patches, 24 of 9 (28 rounded down to a multiple of 8), 64 of 4
    c.naflex.seq_lens = (4, 9, 16)
    c.naflex.max_tokens = 16 * 16
    c.naflex.batch_multiple = 8  # the same batches on 1, 2 and 8 devices
    return c
