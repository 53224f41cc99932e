"""unipeft.train: fine-tuning a model on a task with a recipe — config, loop, evaluation, checkpoints.

    from unipeft.train import load_train_config, train
    result = train(load_train_config("configs/sst2_lora.yaml", ["max_steps=100"]))
    print(result.metrics)
"""

from unipeft.train.config import JsonlTaskConfig, TrainConfig, load_train_config, train_config_from_dict
from unipeft.train.evaluate import evaluate
from unipeft.train.loop import TrainResult, train

__all__ = ["TrainConfig", "JsonlTaskConfig", "load_train_config", "train_config_from_dict", "train", "TrainResult",
           "evaluate"]
