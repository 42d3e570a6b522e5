"""The training run: the loop, run directories and their lock, checkpoints on disk, metrics, the hosts of a
multi-node run, signals and non-finite steps, ``checkpoint.init_from``; the top layer, which drives an engine."""
