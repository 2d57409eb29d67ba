"""Serves an interactive image-completion demo of a trained iGPT in the browser.

  python demo.py --workdir runs/tiny                 # then open the address it prints
  python demo.py --workdir runs/tiny --port 0        # any free port
  python demo.py --hf imagegpt-small/ --palette kmeans_centers.npy

The page completes a held-out image of the run's test split or an uploaded one (its top rows
kept), or draws images from nothing, showing the pixels as they are sampled. The model is
loaded and its sampler compiled once; requests from several tabs take turns. Everything is
served from this machine: the page fetches nothing from elsewhere.
"""

import importlib

from absl import app, flags

from igpt import cli

_MODEL = cli.ModelFlags("serve")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                            "interface, for other machines too).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on; 0 = a free one.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most completions per request: every request "
                                  "samples this many rows, so nothing recompiles.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    importlib.import_module("PIL")  # before the model loads, so its absence costs nothing
  except ImportError:
    cli.fail('the demo needs Pillow to read images: pip install -e ".[demo]"')

  def serve():
    from igpt.demo import server  # pylint: disable=g-import-not-at-top  (JAX after flags)
    server.main(_MODEL.source(), _HOST.value, _PORT.value, _MAX_BATCH.value)

  cli.run_main(serve, interrupted_hint="demo stopped")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
