"""Writes the HF-parity fixtures in tests/fixtures/ (needs torch and transformers).

    python scripts/make_parity_fixture.py            # rewrites tests/fixtures/hf_parity_*.npz

Each fixture holds a randomly initialised `ImageGPTForCausalImageModeling` (every weight
re-drawn with a fixed torch seed, Conv1D biases kept zero), its config, random colour tokens
`x` and the reference outputs of HF's eager float32 forward pass on `[SOS] + x[:-1]`:
the 512 colour logits and every hidden state under our names (`embed`, `h_{i}`, `ln_f`).
tests/test_parity.py reads them without torch; it also imports the builders below to run the
same comparison live when torch is installed.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "tests", "fixtures")

# Two shapes that differ in width, heads, head size, depth and sequence length, kept small
# (each fixture < 1 MB): name -> (layers, width, heads, image side, batch).
FIXTURE_CONFIGS = {
    "hf_parity_l2_d64_h4_4x4": (2, 64, 4, 4, 3),
    "hf_parity_l3_d48_h6_8x8": (3, 48, 6, 8, 2),
}


def hf_config_dict(num_layers: int, d_model: int, num_heads: int, side: int,
                   vocab_size: int = 512) -> dict:
  """config.json fields of an ImageGPT with these shapes; vocab_size counts colours only."""
  return dict(vocab_size=vocab_size + 1, n_positions=side * side, n_embd=d_model,
              n_layer=num_layers, n_head=num_heads, activation_function="quick_gelu",
              layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              tie_word_embeddings=False)


def randomize_(model, seed: int) -> None:
  """Re-draws every weight (HF zero-/one-initialises some, which would hide layout bugs).

  Scales keep activations O(1) and attention far from uniform, so a transposed or permuted
  weight changes the outputs visibly; Conv1D biases stay zero (iGPT has none).
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  d = model.config.n_embd
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if name.endswith(".bias"):
        p.zero_()
        continue
      if "ln_" in name:  # norm gains: around 1, but not 1
        value = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
      elif name.endswith(("wte.weight", "wpe.weight")):
        value = 0.5 * torch.randn(p.shape, generator=gen)
      else:  # Conv1D [in, out] and lm_head [out, in]: unit-variance outputs on normalised inputs
        fan_in = p.shape[0] if "transformer.h." in name else p.shape[1]
        value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
      p.copy_(value.to(p.dtype))


def build_hf_model(config: dict, seed: int):
  """A random float32 eager-attention `ImageGPTForCausalImageModeling` in eval mode."""
  import torch
  from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
  torch.manual_seed(seed)
  model = ImageGPTForCausalImageModeling(ImageGPTConfig(**config, attn_implementation="eager"))
  model = model.float().eval()
  randomize_(model, seed)
  return model


def hf_reference(model, x: np.ndarray) -> dict[str, np.ndarray]:
  """HF outputs on colour tokens x [B, n] under our names: logits and every hidden state.

  HF never prepends SOS itself, so it is fed `[SOS] + x[:-1]` (SOS = vocab_size - 1).
  hidden_states[0] is our `embed`, [i] our `h_{i-1}`, and the last one has ln_f applied
  (our `ln_f`); the raw output of the last block, which HF does not return, is taken with a
  forward hook.
  """
  import torch
  sos = model.config.vocab_size - 1
  ids = np.concatenate([np.full((x.shape[0], 1), sos), x[:, :-1]], axis=1)
  raw = {}
  last = model.transformer.h[-1]

  def keep_output(module, args, out):
    raw["h"] = out[0]  # returns None: a returned value would replace the block's output

  hook = last.register_forward_hook(keep_output)
  try:
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True,
                  use_cache=False)
  finally:
    hook.remove()
  hidden = [h.float().numpy() for h in out.hidden_states]
  n_layer = model.config.n_layer
  ref = {"logits": out.logits.float().numpy(), "hidden/embed": hidden[0],
         "hidden/ln_f": hidden[n_layer], f"hidden/h_{n_layer - 1}": raw["h"].float().numpy()}
  for i in range(1, n_layer):
    ref[f"hidden/h_{i - 1}"] = hidden[i]
  return ref


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  """The model's state dict (parameters and any persistent buffers) as float32 numpy."""
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def make_fixture(name: str, layers: int, d_model: int, heads: int, side: int, batch: int,
                 seed: int) -> str:
  """Builds one random model, runs it and writes tests/fixtures/<name>.npz; returns the path."""
  config = hf_config_dict(layers, d_model, heads, side)
  model = build_hf_model(config, seed)
  x = np.random.default_rng(seed).integers(0, 512, size=(batch, side * side), dtype=np.int32)
  arrays = {f"sd/{k}": v for k, v in state_dict_numpy(model).items()}
  arrays.update(hf_reference(model, x))
  arrays["x"] = x
  arrays["hf_config"] = np.array(json.dumps(config))
  os.makedirs(FIXTURE_DIR, exist_ok=True)
  path = os.path.join(FIXTURE_DIR, name + ".npz")
  np.savez_compressed(path, **arrays)
  return path


def main(argv) -> None:
  del argv
  import transformers
  for seed, (name, shape) in enumerate(sorted(FIXTURE_CONFIGS.items())):
    path = make_fixture(name, *shape, seed=seed)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, transformers "
          f"{transformers.__version__})")


if __name__ == "__main__":
  main(sys.argv)
