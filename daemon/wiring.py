"""The runtime objects built from a validated config: REST and stream settings and the store's writer.

The service and the one-shot commands both build them here, so a config key means the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import KronosConfig, live_path_for
from daemon.market.rest import RestSettings
from daemon.market.websocket import StreamSettings
from storage.writer import StoreWriter


def open_writer(config: KronosConfig, snapshot: Path | None = None) -> StoreWriter:
    """The store's writer for the published database `snapshot` (default: the configured one); it publishes
    the snapshot when it closes (and periodically during long jobs). Its own file sits next to the snapshot."""
    storage = config.storage
    snapshot = snapshot or storage.snapshot_path
    return StoreWriter(
        live_path_for(snapshot),
        snapshot_path=snapshot,
        snapshot_interval_s=storage.snapshot_interval_s,
        memory_limit=storage.memory_limit,
        threads=storage.threads,
        snapshot_storage_version=storage.snapshot_storage_version,
        snapshot_retention_s=storage.snapshot_retention_s,
    )


def rest_settings(config: KronosConfig, snapshot: Path, rest_url: str | None = None) -> RestSettings:
    """REST client settings from `exchange.*`; a 418 ban is remembered next to the database."""
    exchange = config.exchange
    return RestSettings(
        base_url=rest_url or exchange.rest_url,
        weight_share=exchange.weight_share,
        timeout_s=exchange.request_timeout_s,
        max_retries=exchange.max_retries,
        backoff_base_s=exchange.backoff_base_s,
        backoff_max_s=exchange.backoff_max_s,
        ban_file=snapshot.parent / "binance-ban.json",
    )


def stream_settings(config: KronosConfig, ws_url: str | None = None) -> StreamSettings:
    exchange = config.exchange
    return StreamSettings(
        base_url=ws_url or exchange.ws_url,
        watchdog_s=exchange.watchdog_s,
        max_connection_age_s=exchange.max_connection_age_s,
        backoff_max_s=exchange.backoff_max_s,
    )
