"""iGPT-M (36 layers, width 1024, 8 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_m.py --workdir runs/igpt_m
  python train.py --config configs/igpt_m.py:cifar10 --workdir runs/igpt_m_cifar10
"""

from igpt.config import paper_config


def get_config(variant=None):
  """`variant`: imagenet32 (default), cifar10 or cifar100."""
  return paper_config("m", variant)
