"""`python -m igpt.import_openai`: a checkpoint of OpenAI's iGPT release as a run folder.

  python -m igpt.import_openai --checkpoint downloads/model.ckpt-1000000 \\
      --palette downloads/kmeans_centers.npy --out runs/igpt_s_openai [--hf_out hf/igpt_s]

The entry point only: the work is `igpt.commands.import_openai`'s. Its flags are defined when
this runs as a program, never when it is imported.
"""

from __future__ import annotations


def _main() -> None:
  # Imported here, so that importing this module defines no flag at all (igpt.cli defines
  # --debug as it is imported).
  from igpt import cli  # pylint: disable=g-import-not-at-top
  from igpt.commands import import_openai  # pylint: disable=g-import-not-at-top
  cli.start(import_openai)


if __name__ == "__main__":
  _main()
