"""The run config: one ml_collections ConfigDict per run, built by the files in `configs/`.

Each file in `configs/` calls `base_config(...)` with its model size and overrides what
differs. Every number with a unit carries it in its name (`total_steps`, `warmup_steps`).
"""

from __future__ import annotations

import json
import os

import ml_collections

from igpt.errors import UserError


# What a resumed run may change: neither the model nor the data stream, only how long the run
# goes, what it reports and where it runs (a name ending in "." covers a whole section).
# Every other field is the run's identity and must equal what its checkpoints were made with.
MAY_CHANGE_ON_RESUME = (
    "model.attention", "model.remat",
    "data.data_dir", "data.test_split", "data.num_workers", "data.prefetch_batches",
    # The palette file is compared by content when a run resumes.
    "data.palette_path",
    "train.total_steps", "train.log_every_steps", "train.eval_every_steps",
    "train.eval_batches", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.peak_flops_per_device", "train.grad_accum_steps", "train.profile_start_step",
    "train.profile_num_steps", "train.sample_every_steps", "train.sample_num_images",
    "train.compile_cache_dir",
    "guard.", "mesh.", "sharding_rules", "distributed",
)

# Fields that name a file or folder: compared on resume as the paths they point to, so the
# same place given relative or absolute is the same run.
PATH_FIELDS = ("init_from", "data.path", "data.data_dir", "data.palette_path")

def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def _at_least(section, prefix: str, names, low: int, meaning: str = "") -> None:
  for name in names:
    _require(section[name] >= low, f"{prefix}{name}={section[name]} must be >= {low}"
             + (f" ({meaning})." if meaning else "."))


def data_section() -> ml_collections.ConfigDict:
  """Where images come from: the `data` fields every config that reads a dataset shares
  (run configs add the palette's fields, the probe config a size limit)."""
  return ml_collections.ConfigDict(dict(
      # source: "tfds" (name = a tfds name), "cifar" (path = cifar-10-batches-py or
      # cifar-100-python), "idx" (path = folder of MNIST-format files), "folder"
      # (path = image files or .npz arrays), "digits" (embedded, needs no network),
      # "openai_npy" (path = folder of OpenAI's pre-tokenised {name}_trX.npy ... files).
      source="tfds",
      name="cifar10",
      path="",
      data_dir="",  # tfds data_dir; empty = tfds default (~/tensorflow_datasets)
      train_split="train",
      val_split="",  # empty = carve val_examples out of the training split
      val_examples=5000,
      test_split="test",
  ))


def check_data(data) -> None:
  """A run's `data` section's own check (which source and split exist is the readers')."""
  _at_least(data, "data.", ["num_workers"], 0, "0: batches made in the loop")
  _at_least(data, "data.", ["prefetch_batches"], 0, "0: 2 per worker")
  _require(not (data.augment and data.source == "openai_npy"),
           "data.augment=True crops and flips images, but data.source='openai_npy' holds "
           "palette tokens; set --config.data.augment=False.")


def mesh_section() -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 = all remaining devices. Pure FSDP by default."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def model_section(**fields) -> ml_collections.ConfigDict:
  """The model's shape and numerics; `igpt.model.ModelConfig` checks them as it is built."""
  return ml_collections.ConfigDict(dict(
      vocab_size=0,  # output classes; 0 = one per palette colour (data.palette_size)
      dtype="float32",  # compute dtype (float32 | bfloat16 | float16); params stay float32
      remat=False,  # rematerialise each block in the backward pass (less memory, more FLOPs)
      # auto: our blocked kernel on CPU, cuDNN flash attention on GPU in half precision
      # (else XLA), Pallas splash attention on TPU where its block sizes fit (else XLA); or
      # force one of blocked | xla | cudnn | splash.
      attention="auto", **fields))


def optim_section() -> ml_collections.ConfigDict:
  """Adam and the learning-rate schedule (the paper's recipe)."""
  return ml_collections.ConfigDict(dict(
      lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=390,  # about one epoch of CIFAR-10 at batch 128
      # "cosine": linear warm-up, then cosine decay to 0 at train.total_steps; "constant":
      # linear warm-up, then lr (fine-tuning).
      schedule="cosine",
      clip_grad_norm=0.0,  # 0 = no clipping
  ))


def check_optim(optim) -> None:
  """The `optim` section's own check."""
  _require(optim.lr > 0, f"optim.lr={optim.lr} must be > 0.")
  for name in ("b1", "b2"):
    _require(0 <= optim[name] < 1, f"optim.{name}={optim[name]} must be in [0, 1).")
  _require(optim.eps > 0, f"optim.eps={optim.eps} must be > 0.")
  for name in ("weight_decay", "clip_grad_norm"):
    _require(optim[name] >= 0, f"optim.{name}={optim[name]} must be >= 0 (0: off).")
  _require(optim.schedule in ("cosine", "constant"),
           f"optim.schedule={optim.schedule!r}: use 'cosine' or 'constant'.")


def train_section() -> ml_collections.ConfigDict:
  """How long, how big, and what the loop reports and saves."""
  return ml_collections.ConfigDict(dict(
      batch_size=128,  # global batch, summed over all devices and hosts
      grad_accum_steps=1,
      total_steps=1_000_000,
      log_every_steps=100,
      eval_every_steps=5000,
      eval_batches=20,
      checkpoint_every_steps=5000,
      keep_checkpoints=3,
      peak_flops_per_device=0.0,  # 0 = look it up from the device kind for MFU
      # A jax.profiler trace of profile_num_steps steps from profile_start_step (0 = none),
      # into <workdir>/profile/ (TensorBoard's profile tab or Perfetto).
      profile_start_step=0,
      profile_num_steps=0,
      # Every sample_every_steps (0 = never) a fixed-seed picture of sample_num_images
      # unconditional samples and completions of as many held-out images goes to TensorBoard
      # and <workdir>/samples/step_<N>.png; its time is logged and kept out of tokens/s.
      sample_every_steps=0,
      sample_num_images=4,
      # JAX's persistent compilation cache: "" = the user cache folder (~/.cache/igpt/jax),
      # "off", or a folder. A restarted run loads its compiled train step from there.
      compile_cache_dir="",
  ))


def check_train(train) -> None:
  """The `train` section's own check."""
  _at_least(train, "train.", ["batch_size", "grad_accum_steps", "total_steps",
                              "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                              "keep_checkpoints", "sample_num_images"], 1)
  _at_least(train, "train.", ["sample_every_steps"], 0, "0: no samples")
  _at_least(train, "train.", ["profile_start_step", "profile_num_steps"], 0,
            "profile_num_steps=0: no trace")


def guard_section() -> ml_collections.ConfigDict:
  """Stops a diverging run before it is checkpointed (see igpt.guards.DivergenceGuard): the
  loss may not exceed max_loss_ratio x the first step's loss, nor the param norm
  max_param_norm_ratio x its initial value. 0 turns a check off."""
  return ml_collections.ConfigDict(dict(max_loss_ratio=3.0, max_param_norm_ratio=100.0))


def base_config(*, num_layers: int, d_model: int, num_heads: int, image_side: int = 32,
                **model_overrides) -> ml_collections.ConfigDict:
  """Default run config for a model of the given size, with the paper's training recipe.

  Every field a run reads is here with its default (a config file only changes values).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "ar": next pixel; "bert": masked pixels (p = bert_mask_prob); "classify": fine-tuning
  # (a linear head on the mean-pooled final stream + the next-pixel loss; configs/finetune.py).
  c.objective = "ar"
  c.bert_mask_prob = 0.15
  # A run folder whose params start this run (its model section and palette are taken);
  # "" = a fresh init.
  c.init_from = ""
  c.finetune = ml_collections.ConfigDict(dict(
      num_classes=0,  # the classify objective's classes (>= 2)
  ))
  c.model = model_section(num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                          image_side=image_side)
  c.model.update(model_overrides)

  c.data = data_section()
  c.data.palette_path = ""  # empty = fit one at the start of training, saved in the workdir
  c.data.palette_size = 512
  c.data.palette_fit_pixels = 1_000_000
  # Training batches only: 4-pixel reflection pad, random crop, horizontal flip (CIFAR), a
  # pure function of (seed, step) like the batch itself.
  c.data.augment = False
  # Training batches are made ahead on num_workers threads (0 = in the loop), up to
  # prefetch_batches of them (0 = 2 per worker); the batch of a step is the same either way.
  c.data.num_workers = 1
  c.data.prefetch_batches = 0

  c.optim = optim_section()
  c.train = train_section()
  c.guard = guard_section()
  c.mesh = mesh_section()
  # (logical axis, mesh axes) pairs replacing entries of igpt.sharding.DEFAULT_RULES, e.g.
  # (("embed", None),) to replicate params over fsdp (plain data parallelism).
  c.sharding_rules = ()
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


def check_run_config(c) -> None:
  """No field the schema lacks, every section's own check, then what two sections must agree
  on (all pure: no files, no devices)."""
  known = default_fields()
  for field in flatten(c.to_dict()):
    _require(field in known, f"{field} is not a run config field; igpt/config.py lists them "
             "(with their defaults).")
  check_data(c.data)
  check_optim(c.optim)
  check_train(c.train)
  _require(0 <= c.optim.warmup_steps < c.train.total_steps,
           f"optim.warmup_steps={c.optim.warmup_steps} must be in [0, train.total_steps="
           f"{c.train.total_steps}).")


def may_change_on_resume(field: str) -> bool:
  """Whether the flattened config field `field` ("train.total_steps") may differ on resume."""
  return any(field == s or (s.endswith(".") and field.startswith(s))
             for s in MAY_CHANGE_ON_RESUME)


def complete(config) -> ml_collections.ConfigDict:
  """`config` with every schema field it lacks set to its default (a run folder written
  before a field existed reads as if it held the default)."""
  # A deep, unlocked copy (ConfigDict(config) would share the nested sections).
  out = ml_collections.ConfigDict(
      config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  for field, default in default_fields().items():
    *sections, name = field.split(".")
    node = out
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if name not in node:
      node[name] = default
  return out


def to_json(config) -> dict:
  """The config as a JSON-ready dict (what config.json and every checkpoint store: the run's
  identity)."""
  return json.loads(config.to_json_best_effort())


def default_fields() -> dict:
  """{flattened field: default value} of the run config schema (a config that predates a
  field is compared as if it held the default)."""
  return flatten(to_json(base_config(num_layers=1, d_model=1, num_heads=1)))


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a.b': value} for a nested config dict."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


# ------------------------------------------------------------------------------------------
# The settings of sample.py and probe.py (the model and its data come from the run folder).
# ------------------------------------------------------------------------------------------

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
SAMPLE_CONFIG_FILE = os.path.join(CONFIGS_DIR, "sample.py")
PROBE_CONFIG_FILE = os.path.join(CONFIGS_DIR, "probe.py")
SAMPLE_MODES = ("completion", "unconditional")
PROBE_POOLINGS = ("norm", "raw")


def sample_settings() -> ml_collections.ConfigDict:
  """What `sample.py` draws and how (configs/sample.py)."""
  c = ml_collections.ConfigDict()
  # "completion": keep the top prompt_rows of real images and sample the rest;
  # "unconditional": sample whole images from nothing.
  c.mode = "completion"
  c.num_samples = 8  # completion: images to complete; unconditional: images to draw
  c.completions_per_image = 4
  c.prompt_rows = 0  # rows kept from the top of each image; 0 = the top half
  # Where completion images come from: a split of the run's `data` section
  # (train | val | test), or image files / folders (comma separated) when `images` is set.
  c.split = "val"
  c.images = ""
  c.first_image_index = 0  # images [first_image_index, first_image_index + num_samples)

  c.temperature = 1.0  # logits / temperature; must be > 0 unless greedy
  c.top_k = 0  # keep the k most likely tokens; 0 = all
  c.top_p = 1.0  # nucleus: the smallest set reaching this probability mass; 1 = off
  c.greedy = False  # take the most likely token every time
  c.seed = 0

  c.batch_size = 32  # images sampled at once (split over all devices)
  # Positions per compiled loop segment; 0 = a quarter of the image, at least 128
  # (igpt.sampling.SEGMENTS, MIN_SEGMENT_LEN).
  c.segment_positions = 0
  c.upscale_factor = 0  # nearest-neighbour pixels per image pixel; 0 = up to ~128 px images
  c.grid_columns = 8  # unconditional grids: images per row
  # JAX's persistent compilation cache: "" = the user cache folder (~/.cache/igpt/jax),
  # "off", or a folder; a repeated call loads the compiled sampler from there.
  c.compile_cache_dir = ""
  # Output file stem. Empty: completion_<split>_step<step>_seed<seed> (completion_val_...),
  # completion_images-<hash>_step<step>_seed<seed> (a hash of the image files completed) or
  # unconditional_step<step>_seed<seed>: completions of other prompts keep their own files.
  c.name = ""
  return c


def check_sample_settings(c) -> None:
  """The sample settings' own check, before any model is loaded (the sampling controls,
  temperature to greedy, are checked by `igpt.sampling.Settings`)."""
  _require(c.mode in SAMPLE_MODES, f"mode={c.mode!r} must be one of {list(SAMPLE_MODES)}.")
  _at_least(c, "", ["num_samples", "completions_per_image", "batch_size"], 1)
  _at_least(c, "", ["prompt_rows", "first_image_index", "upscale_factor",
                    "segment_positions"], 0)


def probe_settings() -> ml_collections.ConfigDict:
  """Which layers `probe.py` probes, how it pools, the L2 sweep and the data (configs/probe.py)."""
  c = ml_collections.ConfigDict()
  # Block indices: "all", one index, or a list like "8,12,-1" (negative: from the end).
  c.layers = "all"
  # "norm": mean over positions of the stream normalised without gain (the paper's f^l);
  # "raw": mean of the un-normalised stream (what the original authors' notebook used).
  c.pooling = "norm"
  # Pool over g x g blocks of the image and concatenate the block means (g*g*width features
  # per layer); 1 = the paper's mean over every position. Must divide the image side.
  c.pool_grid = 1
  # Also probe these layers' features concatenated ("" = no); e.g. "-3,-2,-1".
  c.concat_layers = ""
  # Probe a random-init model of the same shape too (the control: what pretraining bought).
  c.random_init_control = True
  c.random_init_seed = 0
  c.batch_size = 64  # images per forward pass (global, over all devices)
  # JAX's persistent compilation cache: "" = the user cache folder (~/.cache/igpt/jax),
  # "off", or a folder.
  c.compile_cache_dir = ""

  # L2 strengths (the l2 of mean CE + l2/2 ||W||^2, on standardised features), chosen by
  # accuracy on the validation carve of the training split.
  c.l2_grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  c.lbfgs_max_steps = 1000
  c.lbfgs_grad_tol = 1e-5  # stop when the gradient norm is below this

  # Low-data probes on the best layer (by validation accuracy): k labelled examples per
  # class, `draws` draws each (seeds seed .. seed+draws-1); () = skip.
  c.low_data = ml_collections.ConfigDict(dict(examples_per_class=(), draws=5, seed=0))

  # The labelled data (the run config's data fields; images are read at the model's side and
  # encoded with the model's palette).
  c.data = data_section()
  c.data.max_examples_per_split = 0  # 0 = all; else the first N of each split (quick looks)

  # Devices: the batch is split over data x fsdp; params follow the run's sharding rules.
  c.mesh = mesh_section()
  return c


def low_data_sizes(c) -> tuple[int, ...]:
  """`low_data.examples_per_class` of probe settings as a tuple of positive ints (one number
  is one size)."""
  sizes = c.low_data.examples_per_class
  sizes = (sizes,) if isinstance(sizes, (int, str)) else tuple(sizes)
  _require(all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes),
           f"low_data.examples_per_class={c.low_data.examples_per_class!r} must be labels per "
           "class as positive whole numbers, e.g. \"(4,25,100)\".")
  return sizes


def check_probe_settings(c) -> None:
  """The probe settings' own check, before any model or data is read (the layers and the
  pooling grid need the model: `igpt.features` checks them)."""
  _require(c.pooling in PROBE_POOLINGS,
           f"pooling={c.pooling!r}: use one of {list(PROBE_POOLINGS)}.")
  _require(bool(c.l2_grid) and all(float(v) >= 0 for v in c.l2_grid),
           f"l2_grid={tuple(c.l2_grid)} must be non-empty and >= 0.")
  _at_least(c, "", ["lbfgs_max_steps"], 1)
  low_data_sizes(c)
  _at_least(c.low_data, "low_data.", ["draws"], 1)


# The paper's sizes at 32x32: (layers, width, heads, learning rate, batch, steps). XL's head
# count was not published; 16 keeps head_dim = 192. Only S's learning rate is published
# (0.003); M, L and XL take the next lower values of the paper's sweep.
PAPER_SIZES = {
    "s": (24, 512, 8, 3e-3, 128, 1_000_000),
    "m": (36, 1024, 8, 1e-3, 128, 1_000_000),
    "l": (48, 1536, 16, 1e-3, 128, 1_000_000),
    "xl": (60, 3072, 16, 3e-4, 64, 2_000_000),
}


# Datasets a paper-size config can train on (the `:variant` of the config file):
# tfds name, validation split ('' = carved from train), test split, training examples.
PAPER_DATASETS = {
    "imagenet32": ("imagenet_resized/32x32", "validation", "validation", 1_281_167),
    "cifar10": ("cifar10", "", "test", 45_000),
    "cifar100": ("cifar100", "", "test", 45_000),
}


def paper_config(size: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """iGPT-{S,M,L,XL} at 32x32 with the paper's recipe, on ImageNet 32x32 (tfds) by default.

  `variant` names another dataset of PAPER_DATASETS (`configs/igpt_s.py:cifar10`); warm-up
  is one epoch of it.
  """
  variant = variant or "imagenet32"
  if size not in PAPER_SIZES:
    raise UserError(f"unknown size {size!r}; one of {sorted(PAPER_SIZES)}.")
  if variant not in PAPER_DATASETS:
    raise UserError(f"unknown config variant {variant!r}; one of {sorted(PAPER_DATASETS)} "
                    "(e.g. --config configs/igpt_s.py:cifar10).")
  num_layers, d_model, num_heads, lr, batch_size, total_steps = PAPER_SIZES[size]
  name, val_split, test_split, train_examples = PAPER_DATASETS[variant]
  c = base_config(num_layers=num_layers, d_model=d_model, num_heads=num_heads, image_side=32)
  c.data.name = name
  c.data.val_split = val_split
  c.data.test_split = test_split
  c.optim.lr = lr
  c.optim.warmup_steps = train_examples // batch_size  # one epoch
  c.train.batch_size = batch_size
  c.train.total_steps = total_steps
  return c


def parse_sizes(spec: str) -> list[tuple[str, int, int, int, int]]:
  """'s:1,8x256x8:4' -> [(name, layers, width, heads, batch)] (the benchmarks' size lists).

  A name is a paper size (s, m, l, xl) or LAYERSxWIDTHxHEADS; the batch defaults to 1.
  """
  out = []
  for item in filter(None, spec.split(",")):
    size, _, batch = item.partition(":")
    if size in PAPER_SIZES:
      layers, width, heads = PAPER_SIZES[size][:3]
    else:
      try:
        layers, width, heads = (int(v) for v in size.lower().split("x"))
      except ValueError:
        raise UserError(f"size {size!r}: use one of {sorted(PAPER_SIZES)} or "
                        "LAYERSxWIDTHxHEADS, e.g. 8x256x8.") from None
    out.append((size, layers, width, heads, int(batch or 1)))
  return out
