"""Linear probes of a trained iGPT at any layer (the paper's Figure 3), low-data probes too.

  python probe.py --workdir runs/igpt_s                                  # CIFAR-10, all layers
  python probe.py --workdir runs/tiny --config.data.source=digits --config.data.name=digits \\
      --config.data.val_examples=200
  python probe.py --hf imagegpt-small --palette kmeans_centers.npy --out out \\
      --config.layers=8,12,16

Writes a table to the console, and `results_<data>.json`, `accuracy_vs_layer_<data>.png` and a
feature cache (`features/`) to --out (default: <workdir>/probe). Settings: configs/probe.py.
"""

from igpt import cli
from igpt.commands import probe

if __name__ == "__main__":
  cli.start(probe)
