"""Sampling settings for `sample.py` (the model and its data come from the run folder).

  python sample.py --workdir runs/tiny --config.prompt_rows=4 --config.temperature=0.9
  python sample.py --workdir runs/tiny --config.mode=unconditional --config.num_samples=16
"""

import ml_collections


def get_config():
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
  c.segment_positions = 0  # positions per compiled loop segment; 0 = about seq_len / 8
  c.upscale_factor = 0  # nearest-neighbour pixels per image pixel; 0 = up to ~128 px images
  c.grid_columns = 8  # unconditional grids: images per row
  # Output file stem. Empty: completion_<split>_step<step>_seed<seed> (completion_val_...),
  # completion_images-<hash>_step<step>_seed<seed> (a hash of the image files completed) or
  # unconditional_step<step>_seed<seed>: completions of other prompts keep their own files.
  # JAX's persistent compilation cache: "" = the user cache folder (~/.cache/igpt/jax),
  # "off", or a folder; a repeated call loads the compiled sampler from there.
  c.compile_cache_dir = ""
  c.name = ""
  return c
