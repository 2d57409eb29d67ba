"""iGPT-L (48 layers, width 1536, 16 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_l.py --workdir runs/igpt_l
  python train.py --config configs/igpt_l.py:cifar10 --workdir runs/igpt_l_cifar10
"""

from igpt.config import paper_config


def get_config(variant=None):
  """`variant`: imagenet32 (default), cifar10 or cifar100."""
  return paper_config("l", variant)
