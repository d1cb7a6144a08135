"""`detox-tui serve`: the app in a browser through textual-serve, refusing what a web page on another site could ask.

The served app has no authentication: whoever opens its websocket drives a full app process. So the server binds a
loopback address unless ``--allow-remote`` is given, and every websocket must come from a page of the served
address itself (its ``Origin``): a page on another site (``http://evil.example.com``), or one reaching this port by
DNS rebinding, is answered 403 before any process starts. textual-serve is imported only when a server is built.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any
from urllib.parse import urlsplit

from detox_tui.errors import UserError

log = logging.getLogger(__name__)

# The names a loopback bind answers to, whatever --host spelled (a browser on the machine may use any of them).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _bare(host: str) -> str:
    """A host name without IPv6 brackets, lower case ("[::1]" -> "::1")."""
    host = host.strip().lower()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind) is this machine only: localhost, 127.0.0.0/8 or ::1."""
    name = _bare(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> str | None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``; then return the warning to print (else None)."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise UserError(
            f"Refusing to serve on '{host}': it is reachable from other machines and the served app has no "
            "authentication; serve on localhost and use an SSH port-forward, or pass --allow-remote."
        )
    return (
        f"warning: serving on '{host}' with no authentication: anyone who can reach this port "
        "can run the app and its models."
    )


def _host_port(netloc_host: str | None, port: int | None, scheme: str) -> tuple[str, int] | None:
    if not netloc_host:
        return None
    return _bare(netloc_host), port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def _parse_origin(origin: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS:
        return None
    return _host_port(parts.hostname, port, parts.scheme)


def _parse_host_header(host_header: str, scheme: str = "http") -> tuple[str, int] | None:
    return _parse_origin(f"{scheme}://{host_header}") if host_header else None


def machine_names() -> frozenset[str]:
    """This machine's own host names (short and fully qualified), lower case."""
    import socket

    names = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            names.add(get().lower())
        except OSError:
            pass
    return frozenset(n for n in names if n)


def origin_allowed(
    origin: str | None,
    served_host: str,
    served_port: int,
    host_header: str = "",
    local_names: frozenset[str] | set[str] = frozenset(),
) -> bool:
    """Whether a websocket whose page came from ``origin`` may drive the app served on ``served_host:served_port``.

    The origin must name the served port and the served host: any loopback name when the bind is loopback; the
    very host when it is one address or name. Bound to every interface, the server cannot know which address a
    remote browser used, so the origin must be the request's own ``Host`` and that an address, a loopback name or
    one of ``local_names`` (this machine's names): a page on a name the attacker controls that resolves here (DNS
    rebinding) is refused. A missing or unparsable origin is refused: browsers always send one, and the app's own
    page is served from the same address.
    """
    if not origin:
        return False
    parsed = _parse_origin(origin)
    if parsed is None:
        return False
    o_host, o_port = parsed
    if o_port != served_port:
        return False
    served = _bare(served_host)
    if served in WILDCARDS:
        if _parse_host_header(host_header) != (o_host, o_port):
            return False
        return _is_address(o_host) or is_loopback(o_host) or o_host in local_names
    if is_loopback(served):
        return o_host in LOOPBACK_NAMES or o_host == served
    return o_host == served


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_server(command: str, host: str, port: int) -> Any:
    """A textual-serve Server for ``command`` whose websocket refuses foreign origins with 403."""
    try:
        from aiohttp import web
        from textual_serve.server import Server
    except ImportError as exc:
        raise UserError(
            "Serving in a browser needs the optional extra: pip install 'detox-tui[serve]'."
        ) from exc

    class OriginCheckedServer(Server):
        """textual-serve's Server; a websocket from another origin gets 403 and starts no app process."""

        async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
            origin = request.headers.get("Origin")
            host_header = request.headers.get("Host", "")
            if not origin_allowed(origin, self.host, self.port, host_header, self.local_names):
                log.warning(
                    "refused a websocket from origin %r (serving %s:%s)", origin, self.host, self.port
                )
                return web.Response(status=403, text="Forbidden: this app accepts its own page only.\n")
            return await super().handle_websocket(request)

        async def handle_index(self, request: web.Request) -> Any:
            # Bound to every interface, the page's websocket URL names the host the browser asked for (textual-
            # serve would give it http://0.0.0.0:port, which a remote browser cannot reach). Nothing is awaited
            # between setting the URL and the page reading it.
            if _bare(self.host) in WILDCARDS and _HOST_HEADER.fullmatch(request.host or ""):
                self.public_url = f"{request.scheme}://{request.host}"
            return await super().handle_index(request)

    server = OriginCheckedServer(command, host=host, port=port)
    server.local_names = machine_names() if _bare(host) in WILDCARDS else frozenset()
    return server
