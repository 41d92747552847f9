"""The HTTP server: dashboard, JSON API, live updates, /metrics, /healthz and /readyz (aiohttp).

Read-only: only GET and HEAD are routed, and no handler changes anything. With `http.token` set, every
request needs `Authorization: Bearer <token>` (compared in constant time); a loopback-only listener may go
without one (config.py refuses anything else). Errors are JSON: bad input a 400 with the reason, an unknown
path a 404; anything unexpected is logged and answered 500 without the details (it would be a bug).

`kronosd run` runs it as a supervised task; `kronosd dashboard` runs it alone on a state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from daemon.http import api
from daemon.http.events import EventHub, is_close

log = structlog.get_logger("daemon.http")

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "dashboard"
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Everything the page loads is ours: no CDN, no inline script (the chart library adds a <style> element).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason, "status": status}, status=status)


def _middlewares(token: str | None) -> list[Any]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                response = _json_error(401, "this server needs 'Authorization: Bearer <token>' (http.token)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="kronosd"'
                return response
        return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except api.BadRequest as exc:
            response = _json_error(400, str(exc))
        except FileNotFoundError as exc:
            response = _json_error(503, f"nothing to show yet: {exc}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _json_error(exc.status, exc.reason)
            if exc.status == 405:
                response.headers["Allow"] = "GET, HEAD"
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("http_handler_failed", path=request.path)
            response = _json_error(500, "internal error (logged by the daemon)")
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            if request.path.startswith("/api/") or request.path in ("/metrics", "/healthz", "/readyz"):
                response.headers.setdefault("Cache-Control", "no-store")
        return response

    # errors first, so it also shapes the 401 the auth middleware answers
    return [errors, auth]


def _asset_table() -> dict[str, Path]:
    """Every packaged dashboard file by its URL name: only these are served (no path from the URL is opened)."""
    return {path.relative_to(ASSETS).as_posix(): path for path in ASSETS.rglob("*") if path.is_file()}


def build_app(source: Any, hub: EventHub, *, token: str | None = None,
              metrics: Callable[[str], tuple[bytes, str]] | None = None,
              readiness: Callable[[], list[dict[str, Any]]] | None = None) -> web.Application:
    app = web.Application(middlewares=_middlewares(token), client_max_size=1024)
    app["source"], app["hub"], app["token_set"] = source, hub, token is not None
    assets = _asset_table()

    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.FileResponse:
        path = assets.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(reason=f"no asset {request.match_info['name'][:80]}")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "max-age=300"})

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all means the event loop turns.
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        if readiness is None:
            return web.json_response({"ready": True, "checks": [], "mode": source.mode})
        checks = readiness()
        failing = [c for c in checks if not c["ok"]]
        return web.json_response({"ready": not failing, "failing": failing, "checks": checks},
                                 status=503 if failing else 200)

    async def metrics_handler(request: web.Request) -> web.Response:
        if metrics is None:
            raise web.HTTPNotFound(reason="no metrics without a running daemon")
        body, content_type = metrics(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        api.check_params(request, set())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        await response.prepare(request)
        queue = hub.subscribe()
        try:
            await response.write(f"event: hello\ndata: {{\"mode\": \"{source.mode}\"}}\n\n".encode())
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_S)
                except TimeoutError:
                    item = b": heartbeat\n\n"
                if is_close(item):
                    break
                await response.write(item)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page went away (or the server is stopping)
        finally:
            hub.unsubscribe(queue)
        return response

    app.router.add_get("/", index)
    app.router.add_get("/assets/{name:.+}", asset)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/stream", stream)
    api.add_routes(app)
    return app


class HttpServer:
    """One listener for an app; `run()` serves until cancelled (a supervised task in the daemon)."""

    def __init__(self, app: web.Application, host: str, port: int):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self.listening = asyncio.Event()

    async def run(self) -> None:
        # shutdown_timeout: open event streams never end by themselves; the hub closes them first anyway.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            port = runner.addresses[0][1]
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{host}:{port}/"
            self.listening.set()
            log.info("http_listening", url=self.url,
                     auth="bearer token" if self.app["token_set"] else "none (loopback only)")
            await asyncio.Event().wait()
        finally:
            self.listening.clear()
            self.app["hub"].close()
            with contextlib.suppress(Exception):
                await runner.cleanup()
