"""The parts of a training step below the engines: token losses and tasks, optimizer groups, learning-rate
schedules, and the logical checkpoint format that engines, training and conversion all read."""
