"""iGPT-M (36 layers, width 1024, 8 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_m.py --workdir runs/igpt_m
  python train.py --config configs/igpt_m.py --workdir runs/igpt_m_cifar \
      --config.data.name=cifar10 --config.data.val_split= --config.data.test_split=test
"""

from igpt.config import paper_config


def get_config():
  return paper_config("m")
