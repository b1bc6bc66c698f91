"""What people run: the CLI, the process launcher, datasets, training loops, experiments."""
