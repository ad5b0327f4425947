"""The status page's web server: standard library only (``http.server`` in a background thread).

    GET  /               the page (static/index.html, app.js, style.css)
    GET  /api/status     what the page draws (view.page_view), polled once a second
    GET  /file?path=P    a sample image or log inside the queue folder or a job's output folder
    POST /api/stop       {"stop": true|false}: stop after the current job (or take that back)
    POST /api/move       {"name": "job3.json", "delta": -1|1}: move a waiting job up or down

It listens on 127.0.0.1 unless ``status_listen`` says otherwise. Beyond this computer every request
must carry the token printed at start (``?token=...``, kept in the page's address); without it the
answer is 403. On 127.0.0.1 requests must name this computer as their host (no DNS rebinding), and
the two POSTs must be JSON from the page's own origin, so another web site cannot press the buttons.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import secrets
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlsplit

from sd_scripts.core.errors import ConfigError

from ..queue_control import STATUS_FILE, ControlError, move_job, set_stop_after_current, training_status_path
from .files import content_type, servable_file
from .view import allowed_roots, page_view, read_status

__all__ = ["StatusPage", "start_status_page", "check_status_settings", "is_loopback"]

DEFAULT_LISTEN = "127.0.0.1"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_MAX_BODY = 4096
_ADDRESS_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}
_NO_PERMISSION = {errno.EACCES, getattr(errno, "WSAEACCES", errno.EACCES)}


def is_loopback(host: str) -> bool:
    """True for the names of this computer only (127.0.0.1, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = os.name != "nt"  # on Windows it would let a second server share the port
    page: "StatusPage"

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can hang on a machine offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def _bind_error(err: OSError, host: str, port: int) -> ConfigError:
    if err.errno in _ADDRESS_IN_USE:
        return ConfigError(f"status_port: port {port} is already in use on {host} (another status page or program); "
                           f"choose another with --status_port {port + 1 if port < 65535 else 7861}, "
                           "or --status_port 0 for any free port", setting="status_port")
    if err.errno in _NO_PERMISSION:
        return ConfigError(f"status_port: port {port} needs administrator rights here; choose one from 1024 up, "
                           "e.g. --status_port 7861", setting="status_port")
    return ConfigError(f"status_listen: cannot listen on {host} ({err.strerror or err}); use 127.0.0.1 (this "
                       "computer only) or 0.0.0.0 (every network of this computer)", setting="status_listen")


class StatusPage:
    """The page of one queue folder (``queue=True``) or one training's output folder, served until :meth:`close`."""

    def __init__(self, status_path: str, folder: str, *, queue: bool, host: str = DEFAULT_LISTEN, port: int = 0,
                 token: str | None = None):
        self.status_path = os.path.abspath(status_path)
        self.folder = os.path.abspath(folder)
        self.queue = queue
        self.host = host
        self.token = token
        query = ("?token=" + quote(token, safe="")) if token else ""
        self._static = {route: (_read_static(name).replace(b"{{query}}", query.encode()), kind)
                        for route, (name, kind) in _STATIC.items()}
        server_class = type("_BoundServer", (_Server,), {"address_family": _family(host)})
        try:
            self._server = server_class((host, port), _Handler)
        except (OSError, socket.gaierror) as err:
            raise _bind_error(err, host, port) from None
        self._server.page = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="status-page",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The address to open; with the token when one is needed."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = _this_computers_address()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "StatusPage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- what the handler asks
    def allows(self, token: str, host_header: str) -> bool:
        if self.token is not None:
            return hmac.compare_digest(token.encode("utf-8", "replace"), self.token.encode("utf-8"))
        hostname = urlsplit("//" + host_header).hostname or ""
        return is_loopback(hostname)

    def view(self) -> dict:
        return page_view(self.status_path, self.folder, queue=self.queue)

    def served_path(self, path: str) -> str | None:
        return servable_file(path, allowed_roots(read_status(self.status_path), self.folder))

    def static(self, route: str) -> tuple[bytes, str] | None:
        return self._static.get(route)


def _read_static(name: str) -> bytes:
    with open(os.path.join(STATIC_DIR, name), "rb") as handle:
        return handle.read()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _this_computers_address() -> str:
    """This computer's address on its network (what a phone would open); no packet is sent."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # a documentation address: only picks the outgoing interface
        return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()
    finally:
        probe.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "LoRAEasyTrainingStatus"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # the queue's console and logs are for training, not for every poll

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer("HEAD")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD  # refused like the rest without a token, else 405

    def _answer(self, method: str) -> None:
        page = self.server.page
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not page.allows(query.get("token", [""])[0], self.headers.get("Host", "")):
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "refused: open the address printed when the queue "
                                                            "started, token included"})
            return
        if method == "GET":
            self._get(page, url.path, query)
        elif method == "POST":
            self._post(page, url.path)
        else:
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET and POST"})

    def _get(self, page: StatusPage, route: str, query: dict) -> None:
        static = page.static(route)
        if static is not None:
            self._send(HTTPStatus.OK, *static)
        elif route == "/api/status":
            self._send_json(HTTPStatus.OK, page.view())
        elif route == "/file":
            real = page.served_path(query.get("path", [""])[0])
            if real is None:
                self._send_json(HTTPStatus.FORBIDDEN, {"error": "not a file this page shows"})
                return
            with open(real, "rb") as handle:
                self._send(HTTPStatus.OK, handle.read(), content_type(real))
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _post(self, page: StatusPage, route: str) -> None:
        actions: dict[str, Callable[[dict], dict]] = {
            "/api/stop": lambda body: set_stop_after_current(page.folder, body.get("stop") is not False).to_dict(),
            "/api/move": lambda body: move_job(page.folder, str(body.get("name")), _delta(body)).to_dict(),
        }
        if route not in actions:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if not self._from_the_page():
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "refused: the buttons take JSON from the page itself"})
            return
        if not page.queue:
            self._send_json(HTTPStatus.CONFLICT, {"error": "this is a single training, not a queue"})
            return
        body = self._json_body()
        if body is None:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "expected a small JSON object"})
            return
        try:
            self._send_json(HTTPStatus.OK, actions[route](body))
        except ControlError as err:
            self._send_json(HTTPStatus.CONFLICT, {"error": str(err)})

    def _from_the_page(self) -> bool:
        """JSON (which a form on another site cannot send) and, when the browser names one, our own origin."""
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            return False
        origin = self.headers.get("Origin")
        return origin is None or urlsplit(origin).netloc == self.headers.get("Host", "")

    def _json_body(self) -> dict | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        if not 0 < length <= _MAX_BODY:
            return None
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _send_json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token stays out of other sites' logs
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _delta(body: dict) -> int:
    delta = body.get("delta")
    if not isinstance(delta, int) or isinstance(delta, bool):
        raise ControlError("delta: expected -1 (up) or 1 (down)")
    return delta


# --------------------------------------------------------------------------- from main.py's settings
def check_status_settings(store: Any) -> None:
    """Raise ConfigError for a status_port / status_listen a page cannot be served with."""
    port, listen = store.status_port, (store.status_listen or "").strip()
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"status_port: {port} is not a port number; use one from 1024 to 65535, e.g. 7861 "
                          "(0 picks any free port)", setting="status_port")
    if not listen:
        raise ConfigError("status_listen: empty; use 127.0.0.1 (this computer only) or 0.0.0.0 (to watch from a "
                          "phone on your network)", setting="status_listen")
    if port is None and listen != DEFAULT_LISTEN:
        raise ConfigError(f"status_listen: {listen} is set but the status page is off; add --status_port 7861",
                          setting="status_listen")


def _say(text: str) -> None:
    print(text, flush=True)


def start_status_page(store: Any, say: Callable[[str], None] = _say) -> StatusPage | None:
    """Serve the page of the queue (multi_run_folder) or of the training ``store`` describes; None when off."""
    from ..settings_map import output_name_of
    from ..training import is_main_process

    check_status_settings(store)
    if store.status_port is None or not is_main_process():
        return None
    listen = store.status_listen.strip()
    token = None if is_loopback(listen) else secrets.token_urlsafe(18)
    if store.multi_run_folder:
        folder = os.path.abspath(store.multi_run_folder)
        page = StatusPage(os.path.join(folder, STATUS_FILE), folder, queue=True, host=listen,
                          port=store.status_port, token=token)
    else:
        folder = os.path.abspath(store.output_folder)
        page = StatusPage(training_status_path(folder, output_name_of(store)), folder, queue=False, host=listen,
                          port=store.status_port, token=token)
    say(f"status page: {page.url}")
    if token:
        say("note: the status page is open to your network; only this address (with its token) is let in, and it "
            "is shown only this once")
    return page
