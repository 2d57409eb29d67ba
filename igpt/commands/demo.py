"""The body of `demo.py`: load a model once, compile its sampler, serve the page until Ctrl-C."""

from __future__ import annotations

import importlib

from absl import flags

from igpt import cli

_FLAGS = {}


def define_flags() -> None:
  """The model flags (--workdir/--step or --hf/--palette), --host, --port and --max_batch."""
  _FLAGS["model"] = cli.ModelFlags("serve")
  _FLAGS["host"] = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: "
                                       "every interface, for other machines too).")
  _FLAGS["port"] = flags.DEFINE_integer("port", 8000, "Port to listen on; 0 = a free one.")
  _FLAGS["max_batch"] = flags.DEFINE_integer(
      "max_batch", 8, "Most completions per request: every request samples this many rows, "
      "so nothing recompiles.")


def main(argv) -> None:
  """Serves the demo the flags describe; a mistake is one `error:` line (see igpt.cli)."""
  del argv
  try:
    importlib.import_module("PIL")  # before the model loads, so its absence costs nothing
  except ImportError:
    cli.fail('the demo needs Pillow to read images: pip install -e ".[demo]"')

  def serve():
    # JAX and the model's code load after the flags, so --help and flag mistakes are quick.
    from igpt.demo import server  # pylint: disable=g-import-not-at-top
    server.main(_FLAGS["model"].source(), _FLAGS["host"].value, _FLAGS["port"].value,
                _FLAGS["max_batch"].value)

  cli.run_main(serve, interrupted_hint="demo stopped")
