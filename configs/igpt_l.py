"""iGPT-L (48 layers, width 1536, 16 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_l.py --workdir runs/igpt_l
  python train.py --config configs/igpt_l.py --workdir runs/igpt_l_cifar \
      --config.data.name=cifar10 --config.data.val_split= --config.data.test_split=test
"""

from igpt.config import paper_config


def get_config():
  return paper_config("l")
