"""Fine-tuning a pretrained run for classification (the paper's recipe), through train.py.

  python train.py --config configs/finetune.py --workdir runs/s_ft_cifar10 \\
      --config.init_from=runs/igpt_s
  python train.py --config configs/finetune.py:digits --workdir runs/tiny_ft \\
      --config.init_from=runs/tiny

The model section and the palette come from `init_from` (a run folder); the loss is the
classifier's cross-entropy (a linear head on the mean-pooled final normalised stream) plus the
generative loss; Adam as in pretraining at a 10x lower learning rate, constant after warm-up.
The params with the best validation accuracy are kept in <workdir>/best, and their test
accuracy is logged at the end.
"""

from igpt.config import base_config


def get_config(variant: str = "cifar10"):
  # Model sizes are placeholders: init_from replaces them with the pretrained run's.
  c = base_config(num_layers=24, d_model=512, num_heads=8, image_side=32)
  c.objective = "classify"
  c.init_from = ""  # the pretrained run folder ("" = train the classifier from scratch)
  c.finetune.num_classes = 10
  c.data.augment = True  # 4-pixel reflection pad, random crop, horizontal flip (CIFAR)
  c.optim.lr = 3e-4  # 10x below iGPT-S's pretraining rate
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 100
  c.train.total_steps = 20_000
  c.train.eval_every_steps = 500
  c.train.checkpoint_every_steps = 500
  c.train.eval_batches = 40  # the whole 5,000-image validation carve at batch 128
  if variant == "digits":
    c.data.source = "digits"
    c.data.name = "digits"
    c.data.val_examples = 200
    c.data.augment = False  # flipped digits are other digits
    # The tiny model's own pretraining rate: 200 steps at 10x lower barely move a zero head.
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.train.batch_size = 64
    c.train.total_steps = 200
    c.train.log_every_steps = 20
    c.train.eval_every_steps = 50
    c.train.checkpoint_every_steps = 50
    c.train.eval_batches = 4
  elif variant != "cifar10":
    raise ValueError(f"unknown variant {variant!r}: use cifar10 or digits.")
  return c
