"""The training core the three entry scripts share: set-up, config, precision, the loop, checkpoints, logging."""
