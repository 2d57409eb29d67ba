"""The body of `python -m igpt.import_openai`: a checkpoint of OpenAI's iGPT release as a run.

  python -m igpt.import_openai --checkpoint downloads/model.ckpt-1000000 \\
      --palette downloads/kmeans_centers.npy --out runs/igpt_s_openai [--hf_out hf/igpt_s]

The run folder (config.json, palette.npy, params) is what `igpt.trained.load_run` reads. It is
built in a hidden folder beside --out and renamed at the end, so --out either does not exist
or is complete. --out and --hf_out may be bucket URLs (gs://, s3://): the run is written there
directly (Orbax commits each checkpoint), the transformers folder built locally and uploaded,
and what was written is deleted if the import fails. Errors in the inputs end as one `error: ...` line and exit status 2; --debug
(or IGPT_DEBUG=1) shows the traceback instead. Reading the checkpoint needs TensorFlow:
pip install -e ".[openai]".

Importing this module defines no flags: the entry point (igpt/import_openai.py) calls
`define_flags()` and then runs `main`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile

from absl import flags, logging

from igpt import config as config_lib
from igpt import cli
from igpt import palette as palette_lib
from igpt import storage
from igpt.convert import hf as convert_hf
from igpt.convert import openai_tf
from igpt.errors import MissingFileError, UserError
from igpt.readers import openai_npy


def define_flags() -> None:
  """Defines --checkpoint, --palette, --out and --hf_out (once, before the flags are parsed)."""
  flags.DEFINE_string(
      "checkpoint", None, "Checkpoint prefix of the release, e.g. DIR/model.ckpt-1000000 "
      "(beside it: .index and .data-* shards).")
  flags.DEFINE_string("palette", None, "The release's kmeans_centers.npy (512 x 3).")
  flags.DEFINE_string("out", None, "Run folder to create; must not exist.")
  flags.DEFINE_string("hf_out", None, "Also write a transformers folder here "
                      "(autoregressive models only); must not exist.")
  flags.mark_flags_as_required(["checkpoint", "palette", "out"])


def _check_new_folder(path: str, flag: str) -> str:
  if storage.is_remote(path):
    if flag == "out":
      storage.check_run_store(path)
    storage.check_bucket(path)
    if storage.exists(path):
      raise FileExistsError(f"--{flag} {path!r} already exists; give a new folder.")
    return path
  path = os.path.abspath(path)
  if os.path.lexists(path):
    raise FileExistsError(f"--{flag} {path!r} already exists; give a new folder.")
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise MissingFileError(f"--{flag}: the parent folder {parent!r} does not exist.")
  return path


def read_palette(path: str, num_tokens: int):
  """The palette as float32 [num_tokens, 3], checked (finite, in [-1, 1])."""
  centers = palette_lib.load_palette(path)
  if centers.shape != (num_tokens, 3):
    raise UserError(f"palette {path!r} has shape {centers.shape}; the release's "
                    f"kmeans_centers.npy is ({num_tokens}, 3).")
  return centers


def run_config(cfg, palette_path: str):
  """The run config of an imported model `cfg` (igpt.model.ModelConfig)."""
  c = config_lib.base_config(num_layers=cfg.num_layers, d_model=cfg.d_model,
                             num_heads=cfg.num_heads, image_side=math.isqrt(cfg.seq_len))
  c.objective = "ar" if cfg.causal else "bert"
  c.model.vocab_size = cfg.vocab_size
  c.data.palette_size = cfg.vocab_size
  c.data.palette_path = storage.absolute(palette_path)
  return c


@contextlib.contextmanager
def _building(final_path: str, local: bool = False):
  """Yields a fresh hidden folder beside `final_path` (for a URL: the URL itself, or a local
  temporary folder if `local`); deletes what was written if the block fails."""
  if storage.is_remote(final_path) and not local:
    try:
      yield final_path
    except BaseException:
      storage.rmtree(final_path)
      raise
    return
  parent, name = os.path.split(final_path)
  if storage.is_remote(final_path):
    parent, name = None, storage.basename(final_path)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}-", suffix=".tmp")
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _publish(tmp: str, final_path: str) -> None:
  if tmp == final_path:  # written in place (a bucket run)
    return
  # os.rename would quietly replace an empty folder created since the start; refuse it.
  if storage.exists(final_path):
    raise FileExistsError(f"{final_path!r} appeared while importing; it was left as it is.")
  if storage.is_remote(final_path):
    try:
      storage.upload_tree(tmp, final_path)
    except BaseException:
      storage.rmtree(final_path)
      raise
    shutil.rmtree(tmp, ignore_errors=True)
    return
  os.rename(tmp, final_path)


def import_release(checkpoint: str, palette_path: str, out: str,
                   hf_out: str | None = None) -> str:
  """Reads the checkpoint and palette, writes the run folder `out` (and `hf_out`); returns out.

  Everything is checked before anything is written; nothing is left behind on failure.
  """
  out = _check_new_folder(out, "out")
  hf_out = hf_out and _check_new_folder(hf_out, "hf_out")
  if hf_out == out:
    raise UserError("--out and --hf_out must be different folders.")
  prefix = openai_tf.resolve_prefix(checkpoint)
  centers = read_palette(palette_path, openai_npy.NUM_TOKENS)
  print(f"reading {prefix} ...", flush=True)
  cfg, params = openai_tf.load_tf_checkpoint(prefix)
  print(f"  {cfg.num_layers} layers, width {cfg.d_model}, {cfg.num_heads} heads, "
        f"{cfg.seq_len} positions, {'autoregressive' if cfg.causal else 'BERT'}", flush=True)
  if cfg.vocab_size != len(centers):
    raise UserError(f"the checkpoint has {cfg.vocab_size} tokens but the palette "
                    f"{len(centers)} colours.")
  if hf_out and not cfg.causal:
    raise UserError("--hf_out: this is a BERT-objective checkpoint (no model/sos); transformers' "
                    "ImageGPT is autoregressive only. Drop --hf_out.")
  config = run_config(cfg, palette_path)
  step = openai_tf.checkpoint_step(prefix) or 0
  # Imported here: igpt.trained loads Orbax, which none of the checks above need.
  from igpt import trained  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    run_tmp = stack.enter_context(_building(out))
    trained.save_run(run_tmp, config, centers, params, step)
    if hf_out:
      hf_tmp = stack.enter_context(_building(hf_out, local=True))  # transformers writes files
      convert_hf.save_hf_checkpoint(cfg, params, hf_tmp)
      _publish(hf_tmp, hf_out)
    _publish(run_tmp, out)
  print(f"wrote {out}" + (f" and {hf_out}" if hf_out else ""), flush=True)
  return out


def _fail(message) -> None:
  cli.fail(cli.error_line(ValueError(message)))


parse_flags = cli.parse_flags  # absl's parser, flag mistakes reported like every user error


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every input is a --flag.")
  # TensorFlow's start-up and Orbax's per-file chatter on stderr would bury a one-line error;
  # progress goes to stdout.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  logging.set_verbosity(logging.WARNING)
  values = flags.FLAGS  # defined by define_flags
  cli.run_main(lambda: import_release(values.checkpoint, values.palette, values.out,
                                      values.hf_out), debug_hint=False)
