"""igpt: ImageGPT (Generative Pretraining from Pixels) in JAX/Flax."""

__version__ = "0.1.0"
