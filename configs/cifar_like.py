"""32 px images, patch 4, from scratch: the CIFAR-10 recipe shape.

Run:    python train.py --config configs/cifar_like.py --workdir workdirs/cifar_like
        (synthetic 32x32 data by default; point it at real data with
        --config.dataset=imagefolder --config.data.root=ROOT, or
        --config.dataset=tfds:cifar10 where tensorflow_datasets has it prepared)
Model:  a ViT-S-sized encoder of depth 6 (width 384, 6 heads) on 8x8 = 64 patches,
        mean pooling, sin-cos position embedding; pad-4 random crops, flips,
        RandAugment(2, 9), mixup 0.8 / cutmix 1.0, label smoothing 0.1.
Result: none recorded on real data here (no CIFAR copy on the build machine);
        the test suite runs it for a few steps on synthetic data.
"""

from jaxvit.training.configs import base_config, model_config, steps_for_epochs


def get_config():
    c = base_config()
    c.dataset = "synthetic"
    c.image_size = 32
    c.num_channels = 3
    c.num_classes = 10
    c.model = model_config(
        "S/4", depth=6, pool="gap", class_token=False, posemb="sincos2d", drop_path_rate=0.1
    )
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.augment.randaugment_num_ops = 2
    c.augment.randaugment_magnitude = 9.0
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.label_smoothing = 0.1
    c.batch_size = 256
    c.total_steps = steps_for_epochs(50_000, c.batch_size, 200)  # 39,063
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 2_000
    c.data.workers = 2
    c.eval_every = 2_000
    c.checkpoint_every = 2_000
    return c
