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

from absl import app

from igpt import cli

_CONFIG = cli.define_config_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py"),
    "Sampling settings (configs/sample.py).")
_MODEL = cli.ModelFlags("sample from")
_OUT = cli.define_out_flag("<workdir>/samples")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def sample():
    from igpt.commands import sample as command  # pylint: disable=g-import-not-at-top
    command.main(_CONFIG.value, _MODEL.source(), _OUT.value)

  cli.run_main(sample)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
