"""What people run: the CLI, the process launcher, datasets, training loops, experiments."""

from runners.cluster import Cluster, local_cluster

__all__ = ["Cluster", "local_cluster"]
