"""Training: the loop, its settings, optimizers and schedules, batches and guards.

>>> from lmlab.train import TrainConfig, train
>>> result = train(model, train_ids, val_ids, TrainConfig(out_dir="runs/gpt", max_steps=500))
"""

from lmlab.train.config import LogConfig, TrainConfig
from lmlab.train.guards import TrainingDiverged
from lmlab.train.run import Interrupted, RunDir, RunInUse
from lmlab.train.trainer import Supervised, TrainResult, train

__all__ = [
    "Interrupted",
    "LogConfig",
    "RunDir",
    "RunInUse",
    "Supervised",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "train",
]
