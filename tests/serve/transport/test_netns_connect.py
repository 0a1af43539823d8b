"""The namespace connector's protocol, both sides in this process (the namespace itself is in
test_process_netns.py): the init's `serve_connector` hands out connected sockets, the replica's backend uses
them for every connection of its httpx pools."""

from __future__ import annotations

import asyncio
import errno
import http.server
import socket
import threading

import pytest

from ray_dstack.ports import free_port
from ray_dstack.serve.transport.netns_connect import MAX_SOCKET_PATH, NamespaceBackend, NamespaceConnector, connector_for
from ray_dstack.serve.runtime.supervise import serve_connector
from ray_dstack.serve.transport.client import model_server_client


class Who(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peers: list[int] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        Who.peers.append(self.client_address[1])
        answer = b"got " + body
        self.send_response(200)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Who)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Who.peers = []
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def connector_path(tmp_path):
    path = str(tmp_path / "c.sock")
    listener = serve_connector(path)
    yield path
    listener.close()


def test_hands_out_a_connection_to_the_port(server, connector_path):
    sock = NamespaceConnector(connector_path, server).connect(5)
    with sock:
        assert sock.getpeername() == ("127.0.0.1", server)
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
        answer = b""
        while chunk := sock.recv(4096):  # blocking, as an ordinary connected socket (until the server closes)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"got hi")


def test_socket_is_private_to_the_owner(connector_path):
    import os
    import stat

    assert stat.S_IMODE(os.stat(connector_path).st_mode) == 0o600


def test_nothing_listening_is_a_refused_connection(connector_path):
    with pytest.raises(ConnectionRefusedError, match="nothing listens on port"):
        NamespaceConnector(connector_path, free_port()).connect(5)
    assert asyncio.run(NamespaceConnector(connector_path, free_port()).accepts()) is False


def test_no_init_yet_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        NamespaceConnector(str(tmp_path / "missing.sock"), 8000).connect(5)


def test_a_bad_request_gets_an_error_answer(connector_path):
    with socket.socket(socket.AF_UNIX) as unix:
        unix.connect(connector_path)
        unix.sendall(b"eighty\n")
        assert unix.recv(512).startswith(b"error %d " % errno.EINVAL)


def test_httpx_pools_connect_only_through_the_connector(server, connector_path):
    """The URL names a closed port: every answer proves the connection came from the connector; keep-alive
    reuses it (one connection per pool shard for sequential requests)."""
    backend = NamespaceBackend(NamespaceConnector(connector_path, server))

    async def scenario():
        client = model_server_client(f"http://127.0.0.1:{free_port()}", 10, network_backend=backend)
        try:
            answers = [(await client.post("/", content=b"%d" % i)).text for i in range(40)]
        finally:
            await client.aclose()
        return answers

    assert asyncio.run(scenario()) == [f"got {i}" for i in range(40)]
    assert len(set(Who.peers)) <= 16 < len(Who.peers)


def test_refused_is_httpx_connect_error(connector_path):
    import httpx

    backend = NamespaceBackend(NamespaceConnector(connector_path, free_port()))

    async def scenario():
        async with model_server_client("http://127.0.0.1:1", 10, network_backend=backend) as client:
            await client.get("/")

    with pytest.raises(httpx.ConnectError, match="nothing listens"):
        asyncio.run(scenario())


def test_too_long_a_path_falls_back_with_a_warning(tmp_path):
    warnings = []
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    assert connector_for(deep, 8000, warnings.append) is None
    assert "longer than" in warnings[0] and "RAY_DSTACK_WORK_ROOT" in warnings[0]
    assert connector_for(tmp_path / "w", 8000, warnings.append).path == str(tmp_path / "w") + ".sock"
