"""The training loop, engines, references, checkpoints, metrics and the run directory."""
