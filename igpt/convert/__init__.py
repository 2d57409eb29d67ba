"""Converters between our params and other checkpoint formats.

- `hf`: transformers' ImageGPT checkpoints (config.json + safetensors / bin) <-> our params.
- `openai_tf`: the TensorFlow-1 checkpoints of OpenAI's original release -> our params.

Each reads the other format's names and shapes, refuses anything but the model it expects
(naming the missing, unexpected or misshapen entry), and returns plain float32 numpy params.
"""
