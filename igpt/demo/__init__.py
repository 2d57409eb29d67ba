"""The browser demo of `demo.py`: complete a held-out or uploaded image, or draw from nothing.

- `sampler`: the compiled, fixed-shape sampler that streams its tokens chunk by chunk.
- `images`: uploads read into the model's square, palette-coloured images; pixels for the page.
- `session`: one loaded model, its held-out images, requests checked and sampled.
- `server`: the local HTTP server, its one sampling worker and the page (`static/`).
"""
