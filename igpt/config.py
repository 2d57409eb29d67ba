"""The run config: one ml_collections ConfigDict per run, built by the files in `configs/`.

Each file in `configs/` calls `base_config(...)` with its model size and overrides what
differs. Every number with a unit carries it in its name (`total_steps`, `warmup_steps`).
"""

from __future__ import annotations

import json

import ml_collections

from igpt.errors import UserError


# Fields a resumed run may change: they change neither the model nor the data stream, only
# how long the run goes, what it reports and where it runs. Each section below names its own
# (a name ending in "." covers a whole section); everything else is the run's identity and
# must equal what the run's checkpoints were made with.
MAY_CHANGE_ON_RESUME: list[str] = []


def _declare(section: str, *names: str) -> None:
  for name in names:
    field = f"{section}.{name}" if section else name
    if field not in MAY_CHANGE_ON_RESUME:
      MAY_CHANGE_ON_RESUME.append(field)


def data_section() -> ml_collections.ConfigDict:
  """Where images come from: the `data` fields every config that reads a dataset shares
  (run configs add the palette's fields, the probe config a size limit)."""
  _declare("data", "data_dir", "test_split")
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


def mesh_section() -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 = all remaining devices. Pure FSDP by default."""
  _declare("", "mesh.")
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


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

  _declare("model", "attention", "remat")
  c.model = ml_collections.ConfigDict(dict(
      num_layers=num_layers, d_model=d_model, num_heads=num_heads, image_side=image_side,
      vocab_size=0,  # output classes; 0 = one per palette colour (data.palette_size)
      dtype="float32",  # compute dtype (float32 | bfloat16 | float16); params stay float32
      remat=False,  # rematerialise each block in the backward pass (less memory, more FLOPs)
      # auto: our blocked kernel on CPU, cuDNN flash attention on GPU in half precision
      # (else XLA), Pallas splash attention on TPU where its block sizes fit (else XLA); or
      # force one of blocked | xla | cudnn | splash.
      attention="auto"))
  c.model.update(model_overrides)

  c.data = data_section()
  # The palette file itself is compared by content when a run resumes.
  _declare("data", "palette_path")
  c.data.palette_path = ""  # empty = fit one at the start of training, saved in the workdir
  c.data.palette_size = 512
  c.data.palette_fit_pixels = 1_000_000
  # Training batches only: 4-pixel reflection pad, random crop, horizontal flip (CIFAR), a
  # pure function of (seed, step) like the batch itself.
  c.data.augment = False
  # Training batches are made ahead on num_workers threads (0 = in the loop), up to
  # prefetch_batches of them (0 = 2 per worker); the batch of a step is the same either way.
  _declare("data", "num_workers", "prefetch_batches")
  c.data.num_workers = 1
  c.data.prefetch_batches = 0

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=390,  # about one epoch of CIFAR-10 at batch 128
      # "cosine": linear warm-up, then cosine decay to 0 at train.total_steps; "constant":
      # linear warm-up, then lr (fine-tuning).
      schedule="cosine",
      clip_grad_norm=0.0,  # 0 = no clipping
  ))

  _declare("train", "total_steps", "log_every_steps", "eval_every_steps", "eval_batches",
           "checkpoint_every_steps", "keep_checkpoints", "peak_flops_per_device",
           "grad_accum_steps", "profile_start_step", "profile_num_steps",
           "sample_every_steps", "sample_num_images", "compile_cache_dir")
  c.train = ml_collections.ConfigDict(dict(
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

  # Stops a diverging run before it is checkpointed (see igpt.guards.DivergenceGuard): the
  # loss may not exceed max_loss_ratio x the first step's loss, nor the param norm
  # max_param_norm_ratio x its initial value. 0 turns a check off.
  _declare("", "guard.")
  c.guard = ml_collections.ConfigDict(dict(max_loss_ratio=3.0, max_param_norm_ratio=100.0))

  c.mesh = mesh_section()
  # (logical axis, mesh axes) pairs replacing entries of igpt.sharding.DEFAULT_RULES, e.g.
  # (("embed", None),) to replicate params over fsdp (plain data parallelism).
  _declare("", "sharding_rules", "distributed")
  c.sharding_rules = ()
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


# Fields that name a file or folder: compared on resume as the paths they point to, so the
# same place given relative or absolute is the same run.
PATH_FIELDS = ("init_from", "data.path", "data.data_dir", "data.palette_path")


def may_change_on_resume(field: str) -> bool:
  """Whether the flattened config field `field` ("train.total_steps") may differ on resume."""
  return any(field == s or (s.endswith(".") and field.startswith(s))
             for s in MAY_CHANGE_ON_RESUME)


def default_fields() -> dict:
  """{flattened field: default value} of the run config schema (a config that predates a
  field is compared as if it held the default)."""
  return flatten(json.loads(base_config(num_layers=1, d_model=1, num_heads=1)
                            .to_json_best_effort()))


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
