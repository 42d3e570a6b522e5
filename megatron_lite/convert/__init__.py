"""Checkpoint conversion, to and from Hugging Face model directories and DeepSpeed's own ZeRO checkpoints, streamed
tensor by tensor; it reads models and the checkpoint format and never imports the engines or the trainer."""
