"""Triton's HTTP endpoint behind a request-body limit: a streaming reverse proxy (aiohttp) on the public port.

Triton 2.51's HTTP frontend (the one bundled for CPU) dies with SIGSEGV on a request body of about 4 MB or more
(triton-inference-server/server#5840; `--http-max-input-size` only arrived in later releases, PR #8174 and
#8432). `nim_build serve` therefore binds Triton's HTTP server to a private loopback port and puts this proxy on
the public one: a body over `max_body` bytes (Content-Length or counted while it arrives, chunked or not) gets
413 in Triton's own error shape, {"error": "..."}, and never reaches Triton. Everything else passes through as
it is, responses streamed chunk by chunk (generate_stream's server-sent events), and a client that disconnects
closes the upstream request, so Triton cancels it as it does a gRPC stream.
"""

from __future__ import annotations

import asyncio
import json
import threading

DEFAULT_MAX_BODY = 2 << 20  # bytes; prompts of a 128k-token context are about 0.5 MB of text
TRITON_SAFE_MAX_BODY = 3 << 20  # Triton 2.51 crashed from about 4 MB; 3 MB was answered
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}


class HttpGuard:
    def __init__(self, host: str, port: int, upstream: str, max_body: int = DEFAULT_MAX_BODY):
        if not 0 < max_body <= TRITON_SAFE_MAX_BODY:
            raise ValueError(f"max_body must be in 1..{TRITON_SAFE_MAX_BODY} bytes (Triton 2.51 crashes above it)")
        self.host, self.port, self.upstream, self.max_body = host, port, upstream, max_body
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self._session = None  # aiohttp.ClientSession to Triton, made on the guard's loop

    # -- lifecycle (called from the serve thread) ---------------------------------------------------------
    def start(self) -> None:
        """Listen on host:port (raises OSError when it cannot), serving from a background thread."""
        self._thread = threading.Thread(target=self._run, name="nim_build-http-guard", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # a bind failure: start() raises it
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{path:.*}", self._proxy)
        # no total timeout: a stream lasts as long as its generation
        # responses pass through as Triton encoded them (gzip when the client asked for it); one connection per
        # request: on SIGTERM Triton waits for every open HTTP connection, an idle keep-alive one included
        session = ClientSession(
            connector=TCPConnector(limit=0, force_close=True),
            timeout=ClientTimeout(total=None, connect=10),
            auto_decompress=False,
        )
        self._session = session
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
            self._ready.set()
            await self._stopped.wait()
        finally:
            await runner.cleanup()
            await session.close()

    # -- one request ----------------------------------------------------------------------------------------
    async def _proxy(self, request):
        import aiohttp
        from aiohttp import web

        try:
            body = await request.read()  # aiohttp counts the bytes against client_max_size as they arrive
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(request.content_length)
        # aiohttp has already decoded a compressed body (and counted the decoded bytes against the limit)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
        url = f"http://{self.upstream}{request.rel_url}"
        try:
            return await self._forward(request, url, headers, body)
        except aiohttp.ClientConnectorError:  # Triton closed its endpoints (stopping) or is not up yet
            error = json.dumps({"error": "the server is not accepting requests (starting or shutting down)"})
            return web.Response(status=503, content_type="application/json", text=error)

    async def _forward(self, request, url: str, headers: dict, body: bytes):
        from aiohttp import web

        async with self._session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
            if up.headers.get("Content-Length") is not None:  # a whole response: pass it on as one
                return web.Response(status=up.status, headers=out_headers, body=await up.read())
            response = web.StreamResponse(status=up.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in up.content.iter_any():  # server-sent events, as Triton sends them
                await response.write(chunk)
            await response.write_eof()
            return response

    def _too_large(self, length: int | None):
        from aiohttp import web

        size = f" ({length} bytes)" if length else ""
        message = (
            f"the request body{size} is larger than this server accepts ({self.max_body} bytes); "
            "send less, or raise nim_build serve --http-max-body"
        )
        return web.Response(status=413, content_type="application/json", text=json.dumps({"error": message}))
