"""Two-stage Kronos fine-tuning (tokenizer, then predictor): `python -m kronos_model.finetune --config FILE`."""

from kronos_model.finetune.config import FinetuneConfig, load_config
from kronos_model.finetune.trainer import Interrupted, Trainer, TrainingDiverged

__all__ = ["FinetuneConfig", "Interrupted", "Trainer", "TrainingDiverged", "load_config"]
