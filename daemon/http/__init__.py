"""The daemon's HTTP face: dashboard, JSON API, live events, /metrics, /healthz, /readyz (see server.py)."""
