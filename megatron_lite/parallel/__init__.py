"""What is applied to the plain model before an engine wraps it: tensor parallelism, activation checkpointing, compile."""
