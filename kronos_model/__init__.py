"""Kronos for kronosd: checkpoint-compatible model, hub I/O and fast forecasting.

Does not import `daemon` or `storage`.
"""

from kronos_model.generation import generate, sample_tokens
from kronos_model.hub import CheckpointError
from kronos_model.model import Kronos, KronosTokenizer, check_pair
from kronos_model.predictor import Forecast, KronosPredictor, calendar_stamps, candle_features

__all__ = [
    "CheckpointError",
    "Forecast",
    "Kronos",
    "KronosPredictor",
    "KronosTokenizer",
    "calendar_stamps",
    "candle_features",
    "check_pair",
    "generate",
    "sample_tokens",
]
