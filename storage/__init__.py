"""DuckDB candle store (knows nothing about the daemon or the model)."""
