"""`detox-tui serve`: a websocket from another site's page starts nothing (403); other machines only on request.

The origin rules and the bind check run everywhere; the server tests need the 'serve' extra (textual-serve, which
brings aiohttp) and talk only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from detox_tui.cli import main
from detox_tui.errors import UserError
from detox_tui.serving import check_bind, is_loopback, origin_allowed

needs_serve = pytest.mark.skipif(
    find_spec("textual_serve") is None or find_spec("aiohttp") is None,
    reason="needs the 'serve' extra (textual-serve)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "origin, host, port, host_header, ok",
    [
        ("http://localhost:8000", "localhost", 8000, "", True),
        ("http://127.0.0.1:8000", "localhost", 8000, "", True),  # another loopback name
        ("http://[::1]:8000", "localhost", 8000, "", True),
        ("http://localhost:8000", "127.0.0.1", 8000, "", True),
        ("http://evil.example.com", "localhost", 8000, "", False),
        ("http://evil.example.com:8000", "localhost", 8000, "evil.example.com:8000", False),  # DNS rebinding
        ("http://localhost:3000", "localhost", 8000, "", False),  # another local site
        ("http://localhost", "localhost", 80, "", True),
        ("https://localhost", "localhost", 443, "", True),
        ("null", "localhost", 8000, "", False),  # a sandboxed iframe or a file:// page
        ("file://", "localhost", 8000, "", False),
        ("", "localhost", 8000, "", False),
        (None, "localhost", 8000, "", False),
        ("http://localhost:99999", "localhost", 8000, "", False),
        ("http://10.0.0.5:8000", "10.0.0.5", 8000, "", True),
        ("http://localhost:8000", "10.0.0.5", 8000, "", False),
        # Bound to every interface: the page's own Host, if it is an address or one of this machine's names.
        ("http://gpu-box:8000", "0.0.0.0", 8000, "gpu-box:8000", True),
        ("http://192.0.2.7:8000", "0.0.0.0", 8000, "192.0.2.7:8000", True),
        ("http://[2001:db8::7]:8000", "::", 8000, "[2001:db8::7]:8000", True),
        ("http://localhost:8000", "0.0.0.0", 8000, "localhost:8000", True),
        ("http://evil.example.com:8000", "0.0.0.0", 8000, "gpu-box:8000", False),
        ("http://evil.example.com:8000", "0.0.0.0", 8000, "evil.example.com:8000", False),  # DNS rebinding
        ("http://gpu-box:8000", "0.0.0.0", 8000, "", False),
        ("http://192.0.2.7:8000", "0.0.0.0", 8000, "192.0.2.8:8000", False),
    ],
)
def test_origin_rules(origin, host, port, host_header, ok):
    assert origin_allowed(origin, host, port, host_header, {"gpu-box"}) is ok


def test_only_loopback_binds_without_allow_remote():
    for host in ("localhost", "127.0.0.1", "127.0.0.2", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host) and check_bind(host, allow_remote=False) is None
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "gpu-box", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(UserError, match="--allow-remote"):
            check_bind(host, allow_remote=False)
        assert "no authentication" in check_bind(host, allow_remote=True)


def test_cli_refuses_a_remote_host_in_one_line(capsys, monkeypatch):
    started = []
    if find_spec("textual_serve") is not None:
        from textual_serve.server import Server

        monkeypatch.setattr(Server, "serve", lambda self, debug=False: started.append(self.host))
    rc = main(["serve", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and started == []
    assert err.strip().count("\n") == 0 and "--allow-remote" in err and "Traceback" not in err


@needs_serve
def test_cli_allow_remote_serves_with_a_one_line_warning(capsys, monkeypatch):
    from textual_serve.server import Server

    started = []
    monkeypatch.setattr(Server, "serve", lambda self, debug=False: started.append((self.host, self.port)))
    rc = main(["serve", "--host", "0.0.0.0", "--port", "8123", "--allow-remote"])
    err = capsys.readouterr().err
    assert rc == 0 and started == [("0.0.0.0", 8123)]
    assert err.strip().count("\n") == 0 and "no authentication" in err
    # Loopback (the default) says nothing.
    started.clear()
    assert main(["serve", "--port", "8123"]) == 0
    assert started == [("localhost", 8123)] and capsys.readouterr().err == ""


async def _exchange(server, port: int, marker: Path) -> dict[str, object]:
    """Drive an in-process server on 127.0.0.1:port: which websocket handshakes succeed, and the page's URL."""
    import aiohttp
    from aiohttp.test_utils import TestServer

    out: dict[str, object] = {}
    test_server = TestServer(await server._make_app(), host="127.0.0.1", port=port)
    await test_server.start_server()
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for name, headers in [
                ("evil", {"Origin": "http://evil.example.com"}),
                (
                    "rebinding",
                    {"Origin": f"http://evil.example.com:{port}", "Host": f"evil.example.com:{port}"},
                ),
                ("none", {}),
            ]:
                try:
                    async with session.ws_connect(f"{url}/ws", headers=headers):
                        out[name] = 101
                except aiohttp.WSServerHandshakeError as exc:
                    out[name] = exc.status
            out["marker_after_refusals"] = marker.exists()
            # What a browser on another machine sends to a server bound to every interface (an address that
            # only appears in headers here: the request goes to 127.0.0.1).
            name = "localhost" if server.host == "localhost" else "192.0.2.7"
            async with session.get(f"{url}/", headers={"Host": f"{name}:{port}"}) as page:
                out["page"] = await page.text()
            headers = {"Origin": f"http://{name}:{port}", "Host": f"{name}:{port}"}
            async with session.ws_connect(f"{url}/ws", headers=headers) as ws:
                out["own"] = 101
                for _ in range(100):  # the app process writes the marker as it starts
                    if marker.exists():
                        break
                    await asyncio.sleep(0.05)
                await ws.close()
            # textual-serve never closes the app's stdin: let the handler finish and the process exit, then collect
            # its transport while the loop still runs (else it warns from __del__ after the loop closed).
            for _ in range(100):
                if not test_server.runner.server.connections:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            gc.collect()
    finally:
        await test_server.close()
    out["marker"] = marker.exists()
    return out


@needs_serve
@pytest.mark.parametrize("host", ["localhost", "0.0.0.0"])
def test_foreign_origins_get_403_and_start_no_process(tmp_path, host):
    from detox_tui.serving import make_server

    marker = tmp_path / "started"
    command = f"{sys.executable} -c \"open({str(marker)!r}, 'w').close()\""
    port = _free_port()
    out = asyncio.run(_exchange(make_server(command, host=host, port=port), port, marker))
    assert (out["evil"], out["rebinding"], out["none"]) == (403, 403, 403)
    assert out["marker_after_refusals"] is False  # no app process for a refused websocket
    assert out["own"] == 101 and out["marker"] is True  # the app's own page still starts it
    # Bound to every interface, the page points its websocket at the host the browser used.
    if host == "0.0.0.0":
        assert f"ws://192.0.2.7:{port}/ws" in out["page"]
    else:
        assert f"ws://localhost:{port}/ws" in out["page"]


@needs_serve
def test_real_server_refuses_a_foreign_origin(tmp_path):
    """`python -m detox_tui serve` on a free port: its page loads, a websocket from another site gets 403."""
    import os

    import aiohttp

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "detox_tui", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )

    async def probe() -> tuple[int, str, int]:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/") as page:
                        status, text = page.status, await page.text()
                    break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.2)
            try:
                async with session.ws_connect(
                    f"http://127.0.0.1:{port}/ws", headers={"Origin": "http://evil.example.com"}
                ):
                    ws_status = 101
            except aiohttp.WSServerHandshakeError as exc:
                ws_status = exc.status
        return status, text, ws_status

    try:
        status, text, ws_status = asyncio.run(probe())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert status == 200 and f"ws://127.0.0.1:{port}/ws" in text
    assert ws_status == 403
