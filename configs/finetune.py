"""Fine-tune a pretrained ViT at 384 px with a new head on an ImageFolder dataset.

Run:    python train.py --config configs/finetune.py \
            --config.init_from=CHECKPOINT --config.data.root=ROOT \
            --config.num_classes=<classes> --workdir workdirs/finetune
        CHECKPOINT is anything jaxvit.load_pretrained reads: a ViT/AugReg or
        big_vision .npz, a timm .safetensors/.pth, a Hugging Face folder. The
        position embedding is resampled to the 384 px grid (the way the
        checkpoint's own code resizes it) and the head is replaced by a
        zero-init one when the class count differs. Either set the model fields
        to the checkpoint's (variant, pooling, GELU flavour, ...), or add
        --config.model_from_checkpoint=true: the model is then the one the
        checkpoint was made for (DINOv2 with registers/SwiGLU/LayerScale,
        SigLIP's MAP tower, CLIP, DeiT, ...), with this config's num_classes,
        num_channels and image_size, and config.model's dropout, drop path,
        scan, remat and dtype fields; config.json records every field.
        --config.freeze=backbone trains the head only (a linear probe; with
        pool="map" the attention pooling trains too);
        --config.optimizer.layer_decay=0.75 is BEiT/timm layer-wise decay.
Recipe: as "How to train your ViT" fine-tuning: SGD momentum 0.9, lr 0.01 with
        cosine decay, no weight decay, gradient clipping at 1.0, batch 512,
        inputs normalised to [-1, 1].
Result: not run here at 384 px (no pretrained weights can be downloaded on the
        build machine). The test suite fine-tunes from a checkpoint it exports
        itself, at a small size, and (tests/test_finetune.py) from tiny
        transformers checkpoints of random weights (width 32, depth 2, patch 2,
        1 channel, 16 px resampled to the 8 px digits; 300 steps of batch 64,
        2-core CPU): DINOv2 with registers and SwiGLU, full fine-tune with
        layer_decay=0.75, AdamW lr 2e-3: 85.6% test accuracy in 34 s;
        SigLIP with freeze="backbone", AdamW lr 1e-2: 75.0% in 14 s. A
        classifier-only probe of the same random SigLIP tower reached 45.6%,
        one of the random DINOv2's class token 21.7% (random features;
        pretrained ones are what a probe is for).
"""

from jaxvit.training.configs import base_config, model_config


def get_config():
    c = base_config()
    c.dataset = "imagefolder"
    c.data.root = ""
    c.data.crop_fraction = 1.0
    c.image_size = 384
    c.num_channels = 3
    c.num_classes = 10
    c.init_from = ""
    # scanned blocks keeping only the dense layers' outputs: a B/16 step at batch 32 and 224 px
    # takes 3.9 GiB of XLA buffers instead of 8.7 unrolled (benchmarks/README.md)
    c.model = model_config("B/16", scan=True, remat_policy="dots_with_no_batch_dims_saveable")
    c.augment.random_resized_crop = True
    c.augment.crop_scale = (0.08, 1.0)
    c.augment.flip = True
    c.batch_size = 512
    c.total_steps = 10_000
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.warmup_steps = 500
    c.optimizer.schedule = "cosine"
    c.data.workers = 4
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    return c
