"""iGPT-S (24 layers, width 512, 8 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_s.py --workdir runs/igpt_s
  python train.py --config configs/igpt_s.py --workdir runs/igpt_s_cifar \
      --config.data.name=cifar10 --config.data.val_split= --config.data.test_split=test
"""

from igpt.config import paper_config


def get_config():
  return paper_config("s")
