"""Serves an interactive image-completion demo of a trained iGPT in the browser.

  python demo.py --workdir runs/tiny                 # then open the address it prints
  python demo.py --workdir runs/tiny --port 0        # any free port
  python demo.py --hf imagegpt-small/ --palette kmeans_centers.npy

The page completes a held-out image of the run's test split or an uploaded one (its top rows
kept), or draws images from nothing, showing the pixels as they are sampled. The model is
loaded and its sampler compiled once; requests from several tabs take turns. Everything is
served from this machine: the page fetches nothing from elsewhere.
"""

from igpt import cli
from igpt.commands import demo

if __name__ == "__main__":
  cli.start(demo)
