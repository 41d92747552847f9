"""structlog for the service: JSON lines on stdout (journald), a readable console renderer on a terminal.

Library loggers (aiohttp, websockets, aiomqtt's "mqtt") go through the same processors, so every line in
the journal is JSON. Context bound with `structlog.contextvars.bind_contextvars` (symbol, interval,
model_version, run_id) appears on every line logged inside that task.
"""

from __future__ import annotations

import logging
import sys

import structlog

SHARED_PROCESSORS: list = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_service_logging(level: str = "info", json_lines: bool | None = None, stream=None) -> None:
    """Route structlog and stdlib logging to `stream` (stdout); JSON unless it is a terminal."""
    stream = stream or sys.stdout
    as_json = (not stream.isatty()) if json_lines is None else json_lines
    renderer = (structlog.processors.JSONRenderer() if as_json
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*SHARED_PROCESSORS, structlog.processors.dict_tracebacks if as_json
                    else structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("aiohttp.access", "websockets.client", "websockets.server"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
