"""Linear probes of a trained iGPT at any layer (the paper's Figure 3), low-data probes too.

  python probe.py --workdir runs/igpt_s                                  # CIFAR-10, all layers
  python probe.py --workdir runs/tiny --config.data.source=digits --config.data.name=digits \\
      --config.data.val_examples=200
  python probe.py --hf imagegpt-small --palette kmeans_centers.npy --out out \\
      --config.layers=8,12,16

Writes a table to the console, and `results_<data>.json`, `accuracy_vs_layer_<data>.png` and a
feature cache (`features/`) to --out (default: <workdir>/probe). Settings: configs/probe.py.
"""

import os

from absl import app, logging

from igpt import cli

_CONFIG = cli.define_config_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "probe.py"),
    "Probe config file (configs/probe.py).")
_MODEL = cli.ModelFlags("probe")
_OUT = cli.define_out_flag("<workdir>/probe")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def probe():
    from igpt.commands import probe as command  # pylint: disable=g-import-not-at-top
    results = command.main(_CONFIG.value, _MODEL.source(), _OUT.value)
    logging.info("Wrote %s and %s", results["files"]["json"], results["files"]["png"])

  cli.run_main(probe, interrupted_hint="rerun the same command; cached features are reused")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
