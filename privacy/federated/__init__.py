"""Federated learning: data held by its owners, models trained where the data is.

Importing this package registers the worker commands of the ``train`` command set (``nn.fit``,
``nn.sgd_step``) and the label rules that make the model-updates release work for a model
trained operation by operation. Its rooms: :mod:`~privacy.federated.data` (splits, shards,
loaders), :mod:`~privacy.federated.steps` (what runs on a worker), :mod:`~privacy.federated.releases`
(which results are model updates) and :mod:`~privacy.federated.training` (the walk and FedAvg,
and their pure-PyTorch references).
"""

from privacy.federated import releases
from privacy.federated.data import (
    SPLITS,
    FederatedDataLoader,
    FederatedDataset,
    Shard,
    epoch_plan,
    publish_shard,
    shard_order,
    split_indices,
)
from privacy.federated.steps import COMMAND_SET, LOSSES, fit, flat_parameters, load_flat, sgd_step, spec_key
from privacy.federated.training import (
    HEAR_OUT_TIMEOUT,
    History,
    Settings,
    fusable,
    make_model,
    reference_fedavg,
    reference_walk,
    train_fedavg,
    train_walk,
)

__all__ = [
    # data
    "SPLITS",
    "FederatedDataLoader",
    "FederatedDataset",
    "Shard",
    "epoch_plan",
    "publish_shard",
    "shard_order",
    "split_indices",
    # what a worker runs
    "COMMAND_SET",
    "LOSSES",
    "fit",
    "flat_parameters",
    "load_flat",
    "sgd_step",
    "spec_key",
    # which results are model updates
    "releases",
    # training
    "HEAR_OUT_TIMEOUT",
    "History",
    "Settings",
    "fusable",
    "make_model",
    "reference_fedavg",
    "reference_walk",
    "train_fedavg",
    "train_walk",
]
