"""Baseline: the Hugging Face PyTorch ImageGPT training step, timed on this machine.

Builds `ImageGPTForCausalImageModeling` at the requested sizes (n_positions=1024, vocab 513,
row 512 = SOS, no dropout) and times forward + backward + `torch.optim.Adam(betas=(0.9, 0.95))`
on random 512-colour images: `input_ids = [SOS] + x[:-1]`, `labels = x` (the 512-class
targets; HF shifts labels by one inside its loss, so its pairing is one pixel off the TF
objective, but the work is the same). fp32, torch threads = the cores, median of the steps.

  python bench/bench_torch_reference.py --sizes s:1,8x256x8:4 --steps 8

Prints the same table as `bench_train.py` so the two can be compared side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from igpt.config import parse_sizes
from igpt.metrics import flops_per_token  # the FLOPs bench_train.py counts
from igpt.model import ModelConfig


def build_step(torch, layers, width, heads, batch, seq_len, seed=0):
  """The HF training step as a no-arg callable (zero_grad, forward with labels, backward, Adam)."""
  from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
  torch.manual_seed(seed)
  cfg = ImageGPTConfig(vocab_size=513, n_positions=seq_len, n_embd=width, n_layer=layers,
                       n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = ImageGPTForCausalImageModeling(cfg).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
  gen = torch.Generator().manual_seed(seed)
  x = torch.randint(0, 512, (batch, seq_len), generator=gen)
  sos = torch.full((batch, 1), 512, dtype=torch.long)
  input_ids = torch.cat([sos, x[:, :-1]], dim=1)  # the TF forward: SOS + all but the last pixel

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=x).loss
    loss.backward()
    opt.step()
    return loss.detach().item()

  return step


def time_steps(step, warmup, steps):
  """Seconds of each of `steps` calls after `warmup` untimed ones."""
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def row(name, batch, seq_len, times, flops_tok, peak_gflops, extra=""):
  """One table line: median step, spread, tokens/s, images/s, GFLOP/s, MFU."""
  med = statistics.median(times)
  spread = 100 * (max(times) - min(times)) / med
  tok_s = batch * seq_len / med
  gflops = tok_s * flops_tok / 1e9
  return (f"{name:<14} {batch:>5} {1e3 * med:>9.1f} {1e3 * min(times):>9.1f} {spread:>8.1f} "
          f"{tok_s:>9.1f} {tok_s / seq_len:>9.3f} {gflops:>8.1f} "
          f"{100 * gflops / peak_gflops:>6.1f}{extra}")


HEADER = (f"{'config':<14} {'batch':>5} {'ms/step':>9} {'min_ms':>9} {'spread%':>8} "
          f"{'tokens/s':>9} {'images/s':>9} {'GFLOP/s':>8} {'MFU%':>6}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="s:1,8x256x8:4",
                 help="comma list of SIZE:BATCH; SIZE = s|m|l or LAYERSxWIDTHxHEADS")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--peak_gflops", type=float, default=150.0,
                 help="fp32 peak GFLOP/s for MFU (default: the 150 quoted for the 2-core dev "
                      "CPU; its measured jnp.dot peak is higher, see bench/README.md)")
  args = p.parse_args()

  import torch
  torch.set_num_threads(args.threads)
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, "
        f"median of {args.steps} steps after {args.warmup} warm-up")
  print(HEADER)
  for name, layers, width, heads, batch in parse_sizes(args.sizes):
    step = build_step(torch, layers, width, heads, batch, args.seq_len)
    times = time_steps(step, args.warmup, args.steps)
    model_cfg = ModelConfig(num_layers=layers, d_model=width, num_heads=heads,
                            seq_len=args.seq_len)
    print(row(name, batch, args.seq_len, times, flops_per_token(model_cfg),
              args.peak_gflops), flush=True)


if __name__ == "__main__":
  main()
