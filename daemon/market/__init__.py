"""Market data: the exchange interface (exchange.py) with Binance as its first implementation — REST,
websocket and archive clients, kline parsing and the kline file format — and the backfill and live ingestion
that combine them. The exchange simulator the tests and the demo run against is its own package,
`daemon.simulator`.

Layering (cryptofeed / freqtrade style): connection handling (rest.py, websocket.py, archive.py) is
kept apart from parsing (klines.py, kline_files.py) and from storage (storage.writer); backfill.py and
live.py orchestrate them through the `Exchange` protocol.
"""
