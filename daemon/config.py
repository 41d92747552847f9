"""Validated configuration (`config.yaml`). Unknown keys are an error at every level, a misspelled section
(`mqqt:`) included, so typos do not pass silently."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kronos_model.calibration.grid import DEFAULT_LEVELS, validate_levels
from storage.forecasts import STORED_QUANTILES
from storage.intervals import interval_ms

DEFAULT_CONFIG_PATH = Path("config.yaml")


class ExchangeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rest_url: str = "https://api.binance.com"
    ws_url: str = "wss://stream.binance.com:9443"
    archive_url: str = "https://data.binance.vision"
    weight_share: float = Field(0.5, gt=0, le=1, description="most of the per-IP weight limit we may use")
    request_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    watchdog_s: float = Field(120.0, gt=0, description="reconnect a stream silent for this long")
    max_connection_age_s: float = Field(23.5 * 3600, gt=0, description="reconnect before Binance's 24 h cut")
    archive_min_candles: int = Field(5000, ge=1, description="holes at least this long use the archive first")
    listing_check_s: float = Field(300.0, gt=0, description="re-read exchangeInfo this often: pause pairs that "
                                                            "stop trading, resume them when they trade again")


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Path("state")
    database: str = Field("kronos.duckdb", description="published snapshot name users open, in state_dir")
    memory_limit: str = "1GB"
    threads: int = Field(2, ge=1)
    snapshot_interval_s: float = Field(60.0, ge=0)
    snapshot_storage_version: str = "v1.4.0"
    snapshot_retention_s: float = Field(3600.0, ge=0, description="keep a snapshot's part files this long after a "
                                        "newer snapshot replaced it: how long a reader holding it can query it")

    @property
    def snapshot_path(self) -> Path:
        return self.state_dir / self.database

    @property
    def live_path(self) -> Path:
        return live_path_for(self.snapshot_path)


def live_path_for(snapshot_path: Path) -> Path:
    """The writer's private database next to the published one: kronos.duckdb → kronos.live.duckdb."""
    return snapshot_path.with_name(f"{snapshot_path.stem}.live{snapshot_path.suffix or '.duckdb'}")


class MarketsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT"], min_length=1)
    intervals: list[str] = Field(default_factory=lambda: ["1h"], min_length=1)
    history_days: float = Field(60, gt=0, description="history backfilled when a pair has no stored candle")

    @field_validator("symbols")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [symbol.upper() for symbol in value]

    @field_validator("intervals")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for interval in value:
            interval_ms(interval)  # raises a clear error for an unknown interval
        return value

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(symbol, interval) for symbol in self.symbols for interval in self.intervals]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    predictor: str = Field("NeoQuasar/Kronos-small", description="hub id, checkpoint dir, or 'scratch'")
    tokenizer: str = "NeoQuasar/Kronos-Tokenizer-base"
    revision: str | None = None
    max_context: int = Field(512, ge=1)
    device: str = "auto"
    threads: int = Field(1, ge=1, description="torch threads for forecasting")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16 forecasts ~1.4x faster on CPUs with AVX512-BF16/AMX and on GPUs, with "
        "slightly different numbers than the float32 reference")
    keep_versions: int = Field(5, ge=2, description="model versions kept besides current and previous")


class CalibrationSettings(BaseModel):
    """Online calibration of the published close quantiles and P(up) (kronos_model.calibration)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_history: int = Field(50, ge=1, description="outcomes a horizon step needs before it is published calibrated")
    window: int = Field(720, ge=2, description="newest outcomes kept per step")
    warm_origins: int = Field(1000, ge=0, description="newest stored forecasts replayed per pair at start")

    @model_validator(mode="after")
    def _history_fits(self) -> CalibrationSettings:
        if self.min_history > self.window:
            raise ValueError(f"calibration.min_history ({self.min_history}) cannot exceed window ({self.window})")
        return self


class ForecastConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lookback: int = Field(400, ge=2)
    horizon: int = Field(24, ge=1)
    sample_paths: int = Field(30, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    quantiles: list[float] = Field(default_factory=lambda: list(STORED_QUANTILES))
    quantile_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_LEVELS),
                                       description="close quantile levels stored per step, scored and calibrated")
    seed: int = 0
    batch_size: int = Field(16, ge=1, le=1024, description="pairs forecast together in one batched generation")
    worker: Literal["process", "thread"] = Field(
        "process", description="where generations run: a child process (the model never waits for the daemon's "
        "GIL; daemon/model_worker.py) or a thread of the daemon")
    anchor: bool = Field(True, description="shift each forecast's paths onto the observed last candle, removing "
                         "the tokenizer's reconstruction offset (docs/evaluation.md: lower MAE and CRPS)")
    score_every: int = Field(24, ge=1, description="publish rolling ledger scores after this many forecasts")
    score_window_days: float = Field(7, gt=0, description="the rolling window of those scores")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @model_validator(mode="after")
    def _standard_quantiles(self) -> ForecastConfig:
        if not set(STORED_QUANTILES) <= set(self.quantiles):
            levels = ", ".join(map(str, sorted(STORED_QUANTILES)))
            raise ValueError(f"quantiles must include {levels} (the forecasts table stores them)")
        self.quantile_grid = list(validate_levels(self.quantile_grid))
        missing = sorted(set(STORED_QUANTILES) - set(self.quantile_grid))
        if missing:
            raise ValueError(f"quantile_grid must include {', '.join(map(str, missing))}: the published p10/p50/p90 "
                             "are calibrated on the grid")
        return self


class FinetuneScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    every_candles: int | None = Field(500, ge=1, description="start a run after this many new closed candles")
    every_hours: float | None = Field(None, gt=0, description="and/or after this much wall time")
    window_candles: int = Field(8760, ge=10, description="rolling training window per pair")
    holdout_candles: int = Field(200, ge=2, description="most recent candles kept out of training for the gate")
    pairs: list[str] | None = Field(None, description="SYMBOL/interval pairs to train on (default: all)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fine-tuning config keys")
    timeout_minutes: float = Field(180, gt=0)
    nice: int = Field(10, ge=0, le=19)


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["crps_calibrated", "crps", "mae"] = Field(
        "crps_calibrated", description="what the challenger must lower: the CRPS of the calibrated forecasts "
        "(what is published; 'crps' when calibration is off), of the raw sample paths, or the median's MAE")
    margin: float = Field(0.0, ge=0, lt=1, description="challenger metric must be below (1 - margin) x champion's")
    require_significance: bool = Field(False, description="also demand a Diebold-Mariano p-value below alpha")
    alpha: float = Field(0.05, gt=0, lt=1)
    origins: int = Field(32, ge=2)
    sample_paths: int = Field(8, ge=1)
    seed: int = 1234


class MqttConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    prefix: str = "kronos"
    client_id: str | None = None
    keepalive_s: int = Field(60, ge=5)
    reconnect_max_s: float = Field(30.0, gt=0)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port (logged as http_listening)")
    token: str | None = Field(None, min_length=16, description="every request needs Authorization: Bearer <token>")
    stream_silence_s: float = Field(30.0, gt=0, description="/readyz: a stream silent this long is not ready "
                                                             "(Binance pushes a kline update every 2 s)")

    @model_validator(mode="after")
    def _loopback_or_token(self) -> HttpConfig:
        # The dashboard shows everything the daemon knows; off this machine it is nobody else's business.
        if self.enabled and not is_loopback(self.host) and not self.token:
            raise ValueError(f"http.host {self.host!r} is not a loopback address: set http.token (16+ characters; "
                             "clients send it as 'Authorization: Bearer <token>') or bind 127.0.0.1")
        return self


class KronosConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exchange: ExchangeConfig = ExchangeConfig()
    storage: StorageConfig = StorageConfig()
    markets: MarketsConfig = MarketsConfig()
    model: ModelConfig = ModelConfig()
    forecast: ForecastConfig = ForecastConfig()
    finetune: FinetuneScheduleConfig = FinetuneScheduleConfig()
    gate: GateConfig = GateConfig()
    mqtt: MqttConfig = MqttConfig()
    http: HttpConfig = HttpConfig()


def load_config(path: str | Path | None = None) -> KronosConfig:
    """Read `path` (or ./config.yaml when present; defaults otherwise)."""
    chosen = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not chosen.exists():
        if path is not None:
            raise FileNotFoundError(f"config file {chosen} does not exist")
        return KronosConfig()
    try:
        raw: Any = yaml.safe_load(chosen.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{chosen}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{chosen}: expected a mapping of sections at the top level")
    try:
        return KronosConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_explain(error) for error in exc.errors())
        raise ValueError(f"{chosen}: {problems}") from None


def _explain(error: Any) -> str:
    """One validation problem as `section.key: message`; an unknown key also lists the known ones."""
    location = ".".join(map(str, error["loc"]))
    if error["type"] != "extra_forbidden":
        return f"{location}: {error['msg']}"
    model: type[BaseModel] = KronosConfig
    for part in error["loc"][:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return f"{location}: unknown key"
        model = annotation
    return f"{location}: unknown key (known here: {', '.join(model.model_fields)})"
