"""Market data: Binance REST/websocket/archive clients, the backfill that combines them, and an
exchange simulator that speaks the same protocols on 127.0.0.1.

Layering (cryptofeed / freqtrade style): connection handling (rest.py, websocket.py, archive.py) is
kept apart from parsing (klines.py) and from storage (storage.writer); backfill.py and live.py
orchestrate them.
"""
