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

import os

from absl import app, flags

from igpt import cli, sample_cli

_CONFIG = cli.define_config_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py"),
    "Sampling settings (configs/sample.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder to sample from.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF = flags.DEFINE_string("hf", None, "A transformers ImageGPT checkpoint folder instead.")
_PALETTE = flags.DEFINE_string("palette", None, "With --hf: the palette .npy ([k, 3] in [-1, 1]).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/samples).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(lambda: sample_cli.main(_CONFIG.value, _WORKDIR.value, _STEP.value, _HF.value,
                                       _PALETTE.value, _OUT.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
