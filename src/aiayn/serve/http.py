"""HTTP plumbing under the routes: the body-size middleware, the error handlers, uvicorn's h11
protocol with a read timeout, and a server in a thread for tests and benchmarks.

uvicorn caps open connections (`max_connections`, 503 beyond), closes idle keep-alive connections
(`keep_alive_s`) and, with the protocol here, connections whose request does not arrive in full
within `read_timeout_s` (slow or silent clients).
"""

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiayn.serve.limits import ServerLimits

logger = logging.getLogger(__name__)


def require_fastapi() -> None:
    """Raises:
        RuntimeError: naming the missing package and the extra that installs it.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"serving needs FastAPI and uvicorn ({error.name} is missing); "
            "install them with: pip install 'aiayn[serve]'"
        ) from error


def printable(text: str) -> str:
    """`text` with lone surrogates escaped, so it can go into a UTF-8 JSON response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(error: BaseException, max_chars: int = 300) -> str:
    """'Type: first line of the message', short and printable: for a 500's detail."""
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(message) > max_chars:
        message = message[: max_chars - 3] + "..."
    return printable(message)


async def client_gone(receive: Callable) -> None:
    """Return when the client hangs up. Only once the body has been read: the next message
    uvicorn gives is then the disconnect (it waits for it)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before any parsing.

    Checks Content-Length up front and also counts the bytes of chunked bodies (which have none).
    The unread rest of a refused body is uvicorn's to drop; the connection stays usable.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        too_large = JSONResponse(
            {"detail": f"request body too large: the limit is {self.max_bytes} bytes"},
            status_code=413,
        )
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        # Buffer the (small) body so an oversized chunked upload is refused before the app runs.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client has gone: nobody to answer
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)




def add_error_handlers(app: Any) -> None:
    """422 for a body that fails validation (without echoing the bad input) and 500, closing the
    connection, for anything unexpected."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Any, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input, which may not be JSON at all (NaN) or not
        # encodable (a lone surrogate): the 422 then became a 500. Where and why is enough.
        detail = [
            {
                "type": entry["type"],
                "loc": [printable(part) if isinstance(part, str) else part for part in entry["loc"]],
                "msg": printable(entry["msg"]),
            }
            for entry in error.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Any, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        # Starlette re-raises after this response and uvicorn then closes the connection: say so,
        # or a client that reuses it has its next request (a large body: before the 413) reset.
        return JSONResponse(
            {"detail": f"internal error: {one_line(error)}"},
            status_code=500,
            headers={"connection": "close"},
        )


def _h11_with_read_timeout(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol plus one timer: a request's headers and body must arrive within
    `read_timeout_s` of its first byte (or of the connection opening). uvicorn alone waits forever
    on a client that sends nothing, or a byte at a time (its keep-alive timer only runs between
    requests, and any byte stops it), and each such client holds one of `max_connections`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection whose request took over %g s to arrive", read_timeout_s)
                self.transport.close()  # the app, if it waits for the body, sees a disconnect

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._read_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in (or the connection is done)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutH11Protocol


def uvicorn_settings(limits: ServerLimits) -> dict[str, Any]:
    """The `uvicorn.Config` keywords that apply `limits` to connections (serve and
    background_server both use them)."""
    return {
        "limit_concurrency": limits.max_connections,
        "timeout_keep_alive": limits.keep_alive_s,
        "http": _h11_with_read_timeout(limits.read_timeout_s),
    }


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (for tests and benchmarks); yields its base URL.

    Port 0 picks a free port; the socket is bound here, so there is no race for it. The
    connection limits are those of `app.state.limits` (as `serve` sets them).
    """
    require_fastapi()
    import uvicorn

    limits = getattr(app.state, "limits", None) or ServerLimits()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_settings(limits))
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


__all__ = ["BodySizeLimit", "add_error_handlers", "background_server", "client_gone", "one_line", "printable",
           "require_fastapi", "uvicorn_settings"]
