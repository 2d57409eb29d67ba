"""iGPT-XL (60 layers, width 3072, 16 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_xl.py --workdir runs/igpt_xl
  python train.py --config configs/igpt_xl.py:cifar10 --workdir runs/igpt_xl_cifar10
"""

from igpt.config import paper_config


def get_config(variant=None):
  """`variant`: imagenet32 (default), cifar10 or cifar100."""
  return paper_config("xl", variant)
