"""Validated configuration (`config.yaml`). Sections not defined here are kept for other parts of
the daemon; unknown keys inside a defined section are an error, so typos do not pass silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Path("state")
    database: str = Field("kronos.duckdb", description="published snapshot name users open, in state_dir")
    memory_limit: str = "1GB"
    threads: int = Field(2, ge=1)
    snapshot_interval_s: float = Field(60.0, ge=0)
    snapshot_storage_version: str = "v1.4.0"

    @property
    def snapshot_path(self) -> Path:
        return self.state_dir / self.database

    @property
    def live_path(self) -> Path:
        return live_path_for(self.snapshot_path)


def live_path_for(snapshot_path: Path) -> Path:
    """The writer's private database next to the published one: kronos.duckdb → kronos.live.duckdb."""
    return snapshot_path.with_name(f"{snapshot_path.stem}.live{snapshot_path.suffix or '.duckdb'}")


class KronosConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    exchange: ExchangeConfig = ExchangeConfig()
    storage: StorageConfig = StorageConfig()


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
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{chosen}: {problems}") from None
