"""Pretrained checkpoints in and out: Hugging Face folders (config.json + safetensors) and
GGUF files become ``OmniNetModel``s with the same outputs, and a tuned model goes back out
as a Hugging Face folder where that format can express it.

One module per family holds its config translation and tensor-name table; nothing here
imports transformers (a test-only dependency)."""
