"""What people run: the CLI, the process launcher, datasets, training loops, experiments."""

from runners.cluster import Cluster, Placement, launch, local_cluster

__all__ = ["Cluster", "Placement", "launch", "local_cluster"]
