"""The HTTP layer: keep-alive, deadlines for slow clients, quiet disconnects, a bound on
connections, TLS, and a client that reuses its connection."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from herder.app.api import APIServer, APIServerError
from herder.app.client import Client, ClientError, Endpoint, read_client_file, write_client_file
from herder.config import APIConfig
from herder.testing.tls import self_signed_certificate

from .conftest import Engine, sim_config, start_engine, stop_engine


def _with_api(**api: object):
    config = sim_config()
    return config.model_copy(update={"api": config.api.model_copy(update=api)})


@pytest.fixture
def impatient() -> Iterator[Engine]:
    """An engine whose API gives each exchange half a second."""
    eng = start_engine(_with_api(request_timeout=0.5))
    yield eng
    stop_engine(eng)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_requests_share_one_keep_alive_connection(engine):
    host, port = engine.server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    auth = {"Authorization": f"Bearer {engine.token}"}
    try:
        conn.request("GET", "/api/v1/instances", headers=auth)
        first = conn.getresponse()
        first.read()
        local = conn.sock.getsockname()
        for _ in range(5):
            conn.request("GET", "/api/v1/containers", headers=auth)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert resp.version == 11
            assert conn.sock.getsockname() == local  # the same connection, not a new one
    finally:
        conn.close()


def test_a_client_that_never_finishes_its_request_is_cut_off_with_408(impatient):
    host, port = impatient.server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # headers never end
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert b"deadline" in reply


def test_a_client_that_dribbles_its_body_is_cut_off(impatient):
    host, port = impatient.server.address
    head = (
        f"POST /api/v1/containers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        f"{impatient.token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + b'{"command": ')
        reply = _read_all(sock)  # the server closes the connection: no hang
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:100]
    assert impatient.dispatcher.queue.list() == []


def test_idle_connections_do_not_hold_up_other_clients(impatient):
    host, port = impatient.server.address
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(100)]
    try:
        assert impatient.request("GET", "/api/v1/instances").status == 200
        # And each idle one is closed at its deadline.
        for sock in idle:
            assert _read_all(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in idle:
            sock.close()


def test_clients_that_go_away_leave_no_traceback(engine, caplog):
    host, port = engine.server.address
    caplog.set_level(logging.DEBUG)
    for data in (
        b"",
        b"GET /api/v1/inst",
        b"POST /api/v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{",
    ):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(data)
        # An abortive close (RST), as a client killed mid-request does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    assert engine.request("GET", "/api/v1/health").status == 200
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]


def test_connections_beyond_the_bound_are_told_to_come_back():
    eng = start_engine(_with_api(max_connections=3))
    host, port = eng.server.address
    held = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
    try:
        reply = eng.request("GET", "/api/v1/health")
        assert reply.status == 503
    finally:
        for sock in held:
            sock.close()
    try:
        # Once they are gone, requests are served again (the server notices the closes).
        for _ in range(100):
            if eng.request("GET", "/api/v1/health").status == 200:
                break
        else:
            raise AssertionError("the server kept refusing after the connections closed")
    finally:
        stop_engine(eng)


def test_too_many_query_parameters_is_400_not_500(engine):
    query = "&".join(f"p{i}=1" for i in range(1000))
    for path in ("/api/v1/health", "/api/v1/containers"):
        reply = engine.request("GET", f"{path}?{query}")
        assert reply.status == 400, reply.body


# --------------------------------------------------------------------------- the client


def test_the_client_keeps_one_connection(engine):
    client = Client(engine.server.url, engine.token)
    try:
        client.health()
        first = client._conn.sock.getsockname()
        client.containers()
        client.instances()
        client.submit({"command": ["sim", "1", "0"]})
        assert client._conn.sock.getsockname() == first
    finally:
        client.close()


def test_the_client_reconnects_after_the_server_closed_its_connection(engine, monkeypatch):
    client = Client(engine.server.url, engine.token)
    try:
        client.health()
        client._conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing an idle connection
        assert client.containers()["items"] == []
    finally:
        client.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_engine(tmp_path) -> Iterator[tuple[Engine, Path]]:
    cert, key = self_signed_certificate(tmp_path)
    eng = start_engine(_with_api(tls_certificate=str(cert), tls_key=str(key)))
    yield eng, cert
    stop_engine(eng)


def test_the_api_over_tls(tls_engine):
    eng, cert = tls_engine
    assert eng.server.url.startswith("https://127.0.0.1:")
    client = Client(eng.server.url, eng.token, ca_file=str(cert))
    try:
        assert client.health()["health"] == "OK"
        uuid = client.submit({"command": ["sim", "1", "0"]})["uuid"]
        assert client.container(uuid)["uuid"] == uuid
    finally:
        client.close()


def test_an_untrusted_certificate_is_refused_by_the_client(tls_engine):
    eng, _ = tls_engine
    with pytest.raises(ClientError, match="certificate is not trusted"):
        Client(eng.server.url, eng.token).health()


def test_plain_http_to_the_tls_port_gets_nothing_useful(tls_engine):
    eng, _ = tls_engine
    host, port = eng.server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError, ssl.SSLError, OSError)):
            conn.request("GET", "/api/v1/health")
            conn.getresponse().read()
    finally:
        conn.close()


def test_a_certificate_that_does_not_load_is_a_startup_error(tmp_path, engine):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    config = _with_api(tls_certificate=str(bad), tls_key=str(bad))
    with pytest.raises(APIServerError, match=r"api\.tls_certificate"):
        APIServer(engine.dispatcher, config).start()


def test_tls_needs_both_certificate_and_key():
    with pytest.raises(ValidationError, match="tls_key is needed too"):
        APIConfig(tls_certificate="/etc/herder/app/api.crt")
    with pytest.raises(ValidationError, match="tls_certificate is needed too"):
        APIConfig(tls_key="/etc/herder/app/api.key")


def test_client_file_records_the_certificate_to_trust(tmp_path):
    write_client_file(tmp_path, "https://127.0.0.1:9190", "tok", "/etc/herder/app/api.crt")
    assert read_client_file(tmp_path) == Endpoint(
        "https://127.0.0.1:9190", "tok", "/etc/herder/app/api.crt"
    )


def test_responses_are_not_held_back_by_nagles_algorithm():
    """A response is written as head then body; without TCP_NODELAY the body waits for the
    client's delayed ACK (40 ms a request).  Checked on the accepted socket itself."""
    from herder.app.api.server import DeadlineProtocol

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str, default: object = None) -> object:
            return {
                "socket": self.sock,
                "peername": ("127.0.0.1", 1),
                "sockname": ("127.0.0.1", 2),
            }.get(name, default)

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        protocol = DeadlineProtocol.__new__(DeadlineProtocol)
        protocol._arm_deadline = lambda: None  # no event loop here

        def connection_made(self, transport):
            return None

        import uvicorn.protocols.http.h11_impl as h11_impl

        original = h11_impl.H11Protocol.connection_made
        h11_impl.H11Protocol.connection_made = connection_made
        try:
            protocol.connection_made(Transport(accepted))
        finally:
            h11_impl.H11Protocol.connection_made = original
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        for sock in (accepted, client, listener):
            sock.close()


# --------------------------------------------------------------------------- the client's HTTP


class _Canned:
    """A server on loopback that reads one request per connection and sends back ``answer``
    (then closes), keeping what was asked: for the framings herder's own server never sends."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.stopping = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            if self.stopping:
                conn.close()
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.stopping = True
        socket.create_connection(self.listener.getsockname()).close()  # wakes accept()
        self.thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def canned() -> Iterator[type[_Canned]]:
    servers: list[_Canned] = []

    class Tracked(_Canned):
        def __init__(self, answer: bytes) -> None:
            super().__init__(answer)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok": "y"}',
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=1\r\n{"ok\r\n'
        b'7\r\n": "y"}\r\n0\r\nTrailer: t\r\n\r\n',
        b'HTTP/1.0 200 OK\r\n\r\n{"ok": "y"}',  # framed by the connection's close
        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok": "y"}',
    ],
    ids=["content-length", "chunked", "close", "interim"],
)
def test_the_client_reads_each_framing_of_an_answer(canned, answer):
    """A reverse proxy in front of herder may answer in chunks or close-delimited."""
    server = canned(answer)
    client = Client(server.url + "/prefix", "tok")
    try:
        assert client.health() == {"ok": "y"}
    finally:
        client.close()
    head = server.requests[0].decode()
    assert head.startswith("GET /prefix/api/v1/health HTTP/1.1\r\n")
    assert f"Host: {server.url.removeprefix('http://')}\r\n" in head
    assert "Authorization: Bearer tok\r\n" in head


def test_a_post_says_how_long_its_body_is(canned):
    server = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    client = Client(server.url, "tok")
    try:
        client._request("POST", "/x", body={"a": 1})
        client._request("POST", "/y")
    finally:
        client.close()
    assert server.requests[0].endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')
    assert server.requests[1].endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}", "cut short"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP answer"),
        (b"", "closed the connection without answering"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    ],
)
def test_a_broken_answer_is_a_client_error(canned, answer, message):
    server = canned(answer)
    with pytest.raises(ClientError, match=f"cannot reach herder at {server.url}: .*{message}"):
        Client(server.url, "tok").health()


def test_a_token_with_a_line_break_is_refused_before_sending(canned):
    server = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    with pytest.raises(ClientError, match="line break"):
        Client(server.url, "tok\r\nX-Injected: 1").health()
    assert server.requests == []
