"""Parallelism applied to a plain model, generic over the families: tensor-parallel layers, plans and the
vocab-parallel loss, the collectives, pipeline stages and schedules, activation checkpointing and compile."""
