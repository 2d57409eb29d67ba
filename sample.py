"""Samples from a trained iGPT: image completions or unconditional images, as a PNG grid.

  python sample.py --workdir runs/tiny                      # complete val images (top half)
  python sample.py --workdir runs/tiny --config.mode=unconditional --config.num_samples=16
  python sample.py --workdir runs/tiny --config.prompt_rows=3 --config.temperature=0.8
  python sample.py --hf igpt-s-hf --palette kmeans_centers.npy \
      --config.images=photos/ --out samples/

Settings are in configs/sample.py (override any with --config.NAME=VALUE); the model and its
data come from the run folder. Writes <out>/<name>.png and the sampled tokens <name>.npy
(default <out>: <workdir>/samples).
"""

from igpt import cli
from igpt.commands import sample

if __name__ == "__main__":
  cli.start(sample)
