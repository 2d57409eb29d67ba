"""iGPT-XL (60 layers, width 3072, 16 heads) on ImageNet 32x32, the paper's recipe.

  python train.py --config configs/igpt_xl.py --workdir runs/igpt_xl
  python train.py --config configs/igpt_xl.py --workdir runs/igpt_xl_cifar \
      --config.data.name=cifar10 --config.data.val_split= --config.data.test_split=test
"""

from igpt.config import paper_config


def get_config():
  return paper_config("xl")
