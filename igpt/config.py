"""The run config: one ml_collections ConfigDict per run, built by the files in `configs/`.

Each file in `configs/` calls `base_config(...)` with its model size and overrides what
differs. Every number with a unit carries it in its name (`total_steps`, `warmup_steps`).
"""

from __future__ import annotations

import ml_collections


def base_config(*, num_layers: int, d_model: int, num_heads: int, image_side: int = 32,
                **model_overrides) -> ml_collections.ConfigDict:
  """Default run config for a model of the given size, with the paper's training recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "ar"  # "ar": next pixel; "bert": masked pixels (p = bert_mask_prob)
  c.bert_mask_prob = 0.15

  c.model = ml_collections.ConfigDict(dict(
      num_layers=num_layers, d_model=d_model, num_heads=num_heads, image_side=image_side,
      dtype="float32",  # compute dtype (float32 | bfloat16 | float16); params stay float32
      remat=False,  # rematerialise each block in the backward pass (less memory, more FLOPs)
      # auto: our blocked kernel on CPU, cuDNN flash attention on GPU in half precision
      # (else XLA), XLA on TPU; or force one of blocked | xla | cudnn.
      attention="auto"))
  c.model.update(model_overrides)

  c.data = ml_collections.ConfigDict(dict(
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
      palette_path="",  # empty = fit one at the start of training, saved in the workdir
      palette_size=512,
      palette_fit_pixels=1_000_000,
  ))
  # Output classes; 0 = one per palette colour (data.palette_size).
  c.model.vocab_size = 0

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=390,  # about one epoch of CIFAR-10 at batch 128
      clip_grad_norm=0.0,  # 0 = no clipping
  ))

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
  ))

  # Stops a diverging run before it is checkpointed (see igpt.guards.DivergenceGuard): the
  # loss may not exceed max_loss_ratio x the first step's loss, nor the param norm
  # max_param_norm_ratio x its initial value. 0 turns a check off.
  c.guard = ml_collections.ConfigDict(dict(max_loss_ratio=3.0, max_param_norm_ratio=100.0))

  # Mesh axis sizes; -1 = all remaining devices. Pure FSDP by default.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # (logical axis, mesh axes) pairs replacing entries of igpt.sharding.DEFAULT_RULES, e.g.
  # (("embed", None),) to replicate params over fsdp (plain data parallelism).
  c.sharding_rules = ()
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


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
    raise ValueError(f"unknown size {size!r}; one of {sorted(PAPER_SIZES)}.")
  if variant not in PAPER_DATASETS:
    raise ValueError(f"unknown config variant {variant!r}; one of {sorted(PAPER_DATASETS)} "
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
        raise ValueError(f"size {size!r}: use one of {sorted(PAPER_SIZES)} or "
                         "LAYERSxWIDTHxHEADS, e.g. 8x256x8.") from None
    out.append((size, layers, width, heads, int(batch or 1)))
  return out
