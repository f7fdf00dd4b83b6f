"""Conversion between distfair model directories and other formats.

``hf`` (Hugging Face safetensors in and out; no pickle), ``gguf`` (llama.cpp GGUF files, read and
dequantized). The model directory they write (``params/`` + ``model_config.json``) is
``model.modeldir``, which the model loader reads without importing the converters.
"""
