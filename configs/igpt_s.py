"""iGPT-S (24 layers, width 512, 8 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_s.py --workdir runs/igpt_s
  python train.py --config configs/igpt_s.py:cifar10 --workdir runs/igpt_s_cifar10
"""

from igpt.config import paper_config


def get_config(variant=None):
  """`variant`: imagenet32 (default), cifar10 or cifar100."""
  return paper_config("s", variant)
