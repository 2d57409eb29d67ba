"""Linear probes of a trained iGPT at any layer (the paper's Figure 3), low-data probes too.

  python probe.py --workdir runs/igpt_s                                  # CIFAR-10, all layers
  python probe.py --workdir runs/tiny --config.data.source=digits --config.data.name=digits \\
      --config.data.val_examples=200
  python probe.py --hf_checkpoint imagegpt-small --palette kmeans_centers.npy --outdir out \\
      --config.layers=8,12,16

Writes a table to the console, and `results_<data>.json`, `accuracy_vs_layer_<data>.png` and a
feature cache (`features/`) to --outdir (default: <workdir>/probe). Settings: configs/probe.py.
"""

import os

from absl import app, flags, logging

from igpt import cli

_CONFIG = cli.define_config_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "probe.py"),
    "Probe config file (configs/probe.py).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run folder of the model to probe.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: newest).")
_HF = flags.DEFINE_string("hf_checkpoint", "",
                          "A transformers ImageGPT checkpoint folder (instead of --workdir).")
_PALETTE = flags.DEFINE_string("palette", "", "Palette .npy for --hf_checkpoint (the "
                               "release's kmeans_centers.npy); a run folder has its own.")
_OUTDIR = flags.DEFINE_string("outdir", "", "Where results go (default: <workdir>/probe).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def probe():
    from igpt import probing  # pylint: disable=g-import-not-at-top  (JAX after flag parsing)
    out_dir = _OUTDIR.value or (os.path.join(_WORKDIR.value, "probe") if _WORKDIR.value else "")
    if _HF.value and not out_dir:
      raise ValueError("--hf_checkpoint needs --outdir: where the results and features go.")
    model = probing.load_model(workdir=_WORKDIR.value, hf_checkpoint=_HF.value,
                               palette_path=_PALETTE.value, step=_STEP.value)
    results = probing.run_probes(_CONFIG.value, model, out_dir)
    logging.info("Wrote %s and %s", results["files"]["json"], results["files"]["png"])

  cli.run_main(probe, interrupted_hint="rerun the same command; cached features are reused")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
