"""Load on the management API: many clients, slow clients, and random requests.

``herder serve`` runs in its own process on the simulated cloud (``examples/sim.yaml``, queue
and state in a temporary directory), so that the load generator (asyncio, one process, its own
minimal HTTP/1.1 client with keep-alive) does not share an interpreter with the server.  Three
phases, each reported as a line of figures:

1. ``clients``: N concurrent clients, each on its own keep-alive connection, doing a realistic
   mix (list a page of 50 containers 40 %, get one container 30 %, read a log chunk 20 %,
   submit 10 %) for ``--seconds``, each waiting a random think time between requests
   (``--think``, exponential, mean 1 s; 0 sends back to back); latency percentiles, errors,
   requests per second and the server's CPU per request.
2. ``slow``: M slow clients that open a connection and send their request a byte a second,
   while the N normal clients run again: the normal clients' latency beside phase 1's, and how
   many slow connections the server cut off (408 or closed) at its deadline.
3. ``random``: R requests with random methods, paths, query strings, headers and bodies,
   ``--random-concurrency`` at a time: the count of each status class; the goal is no 5xx.

    uv run python benchmarks/api_load.py --clients 200 --slow 300 --random 100000

Figures and the machine they were measured on are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "benchmark-token-0123456789abcdef"  # noqa: S105 (a throw-away server)
#: As herder.app.client.REUSE_IDLE: the server closes connections idle for 5 s.
REUSE_IDLE = 2.0


# --------------------------------------------------------------------------- the server


def start_server(data_dir: Path, request_timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """``herder serve`` on the sim driver in a child process; returns it and its URL."""
    config = data_dir / "herder.yaml"
    doc = yaml.safe_load((ROOT / "examples" / "sim.yaml").read_text())
    doc["queue"] = {**doc.get("queue", {}), "path": str(data_dir / "herder.db")}
    doc["api"] = {
        **doc.get("api", {}),
        "listen": "127.0.0.1:0",
        "management_token": TOKEN,
        "request_timeout": request_timeout,
        "max_connections": 2000,
    }
    config.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, HERDER_DATA_DIR=str(data_dir))
    proc = subprocess.Popen(  # noqa: S603 (our own command, no shell)
        [
            shutil.which("herder") or "herder",
            "--config",
            str(config),
            "--log-level",
            "warning",
            "serve",
            "--data-dir",
            str(data_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client_file = data_dir / "client.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if client_file.exists():
            return proc, json.loads(client_file.read_text())["url"]
        if proc.poll() is not None:
            raise SystemExit(f"herder serve exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("herder serve did not start within 60 s")


# --------------------------------------------------------------------------- a minimal client


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened when the server closes it, and, as herder's
    own client does, before use when it sat idle long enough for the server to be closing it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is not None and time.monotonic() - self.last_used > REUSE_IDLE:
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = [f"{method} {target} HTTP/1.1", "Host: herder", f"Authorization: Bearer {TOKEN}"]
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}")
        if body or method == "POST":
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        try:
            status = 100
            while 100 <= status < 200:  # interim answers (100 Continue) come before the real one
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed by the server")
                status = int(status_line.split()[1])
                length, close = 0, False
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    elif name.lower() == "connection" and "close" in value.lower():
                        close = True
            # A HEAD answer announces the length of a body it does not send.
            payload = b"" if method == "HEAD" else await self.reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            raise
        if close:
            self.close()
        self.last_used = time.monotonic()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --------------------------------------------------------------------------- phases


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def line(self, name: str, seconds: float) -> str:
        lat = sorted(self.latencies) or [0.0]

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        return (
            f"{name}: {self.requests} requests in {seconds:.1f}s "
            f"({self.requests / seconds:.0f}/s), "
            f"median {statistics.median(lat) * 1000:.1f} ms, p95 {pct(0.95):.1f} ms, "
            f"p99 {pct(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms, "
            f"failures {sum(self.errors.values())} {dict(self.errors) or ''}"
        )


async def seed(host: str, port: int, count: int) -> list[str]:
    conn = Connection(host, port)
    uuids = []
    for i in range(count):
        body = json.dumps({"command": ["sim", "3600", "0"], "priority": 0, "name": f"seed-{i}"})
        status, payload = await conn.request("POST", "/api/v1/containers", body.encode())
        assert status == 201, payload
        uuids.append(json.loads(payload)["uuid"])
    conn.close()
    return uuids


async def mixed_client(
    host: str,
    port: int,
    uuids: list[str],
    stop: float,
    tally: Tally,
    rng: random.Random,
    think: float,
) -> None:
    conn = Connection(host, port)
    await asyncio.sleep(rng.uniform(0, think))  # clients do not all start at the same instant
    while time.monotonic() < stop:
        if think:
            await asyncio.sleep(rng.expovariate(1 / think))
        roll = rng.random()
        body = b""
        if roll < 0.4:
            method, target = "GET", "/api/v1/containers?limit=50"
        elif roll < 0.7:
            method, target = "GET", f"/api/v1/containers/{rng.choice(uuids)}"
        elif roll < 0.9:
            method, target = "GET", f"/api/v1/containers/{rng.choice(uuids)}/log?limit=4096"
        else:
            method, target = "POST", "/api/v1/containers"
            body = json.dumps({"command": ["sim", "1", "0"], "priority": 0}).encode()
        start = time.monotonic()
        try:
            status, _ = await asyncio.wait_for(conn.request(method, target, body), 30)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            tally.errors[type(exc).__name__] += 1
            conn.close()
            continue
        tally.latencies.append(time.monotonic() - start)
        tally.requests += 1
        if status >= 400:
            tally.errors[str(status)] += 1
    conn.close()


async def run_clients(
    host: str, port: int, uuids: list[str], n: int, seconds: float, think: float
) -> Tally:
    tally = Tally()
    stop = time.monotonic() + seconds
    await asyncio.gather(
        *(mixed_client(host, port, uuids, stop, tally, random.Random(i), think) for i in range(n))
    )
    return tally


async def slow_client(host: str, port: int, outcome: Counter[str], started: float) -> None:
    """Send a request a byte a second until the server cuts the connection."""
    request = (
        b"GET /api/v1/health HTTP/1.1\r\nHost: herder\r\nX-Padding: " + b"x" * 200 + b"\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        outcome[f"connect failed: {type(exc).__name__}"] += 1
        return
    try:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(100), 1.0)
            except TimeoutError:
                continue
            kind = "408" if data.startswith(b"HTTP/1.1 408") else "closed" if not data else "other"
            outcome[kind] += 1
            outcome["cut after s"] = max(outcome["cut after s"], int(time.monotonic() - started))
            return
        outcome["never cut"] += 1
    except (ConnectionError, OSError):
        outcome["closed"] += 1
    finally:
        writer.close()


async def run_slow(
    host: str, port: int, uuids: list[str], slow: int, n: int, seconds: float, think: float
) -> tuple[Tally, Counter[str]]:
    outcome: Counter[str] = Counter()
    started = time.monotonic()
    slow_tasks = [
        asyncio.create_task(slow_client(host, port, outcome, started)) for _ in range(slow)
    ]
    await asyncio.sleep(1.0)  # the slow connections are open before the normal load starts
    tally = await run_clients(host, port, uuids, n, seconds, think)
    await asyncio.gather(*slow_tasks)
    return tally, outcome


def random_request(rng: random.Random, uuids: list[str]) -> tuple[str, str, bytes, dict[str, str]]:
    """A request a careless or hostile client might send (the framing itself stays valid)."""
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"])
    base = rng.choice(
        [
            "/api/v1/containers",
            f"/api/v1/containers/{rng.choice(uuids)}",
            f"/api/v1/containers/{rng.choice(uuids)}/cancel",
            f"/api/v1/containers/{rng.choice(uuids)}/priority",
            f"/api/v1/containers/{rng.choice(uuids)}/log",
            "/api/v1/instances",
            "/api/v1/instances/sim-1/hold",
            "/api/v1/health",
            "/api/v1/summary",
            "/metrics",
            "/api/v1/plugins",
            "/",
            "/static/status.js",
            "/api/v1/containers/%00%ff",
        ]
    )
    segment = "".join(f"%{b:02X}" for b in rng.randbytes(rng.randint(0, 12)))
    if rng.random() < 0.2:
        base += "/" + segment
    query = "&".join(
        f"{rng.choice(['state', 'limit', 'after', 'offset', 'x', segment or 'y'])}="
        f"{rng.choice(['1', '-1', '0', 'Queued', 'nope', segment, '9' * 30, ''])}"
        for _ in range(rng.randint(0, 6))
    )
    target = base + (f"?{query}" if query else "")
    values: list[object] = [None, True, 1, -1, 2**70, 1.5, "", "x" * 50, [], {}, ["a"], {"a": 1}]
    doc: object = {
        rng.choice(
            ["command", "image", "priority", "runtime_constraints", "reason", "zz"]
        ): rng.choice(values)
        for _ in range(rng.randint(0, 4))
    }
    if rng.random() < 0.1:
        doc = rng.choice(values)
    body = json.dumps(doc).encode() if method in ("POST", "PUT", "PATCH") else b""
    if rng.random() < 0.05:
        body = rng.randbytes(rng.randint(0, 64))
    headers = {}
    if rng.random() < 0.3:
        headers[rng.choice(["Accept", "X-Forwarded-For", "Cookie", "Range", "Expect"])] = (
            rng.choice(["*/*", "1.2.3.4", "a=b", "bytes=0-1", "100-continue", "\t"])
        )
    return method, target, body, headers


async def run_random(
    host: str, port: int, uuids: list[str], total: int, concurrency: int
) -> Counter[str]:
    statuses: Counter[str] = Counter()
    remaining = iter(range(total))

    async def worker(seed_: int) -> None:
        rng = random.Random(seed_)
        conn = Connection(host, port)
        for _ in remaining:
            method, target, body, headers = random_request(rng, uuids)
            try:
                status, _ = await asyncio.wait_for(conn.request(method, target, body, headers), 30)
            except (
                TimeoutError,
                OSError,
                asyncio.IncompleteReadError,
                ValueError,
                IndexError,
            ) as exc:
                statuses[f"failed: {type(exc).__name__}"] += 1
                conn.close()
                continue
            statuses[f"{status // 100}xx"] += 1
            if status >= 500:
                statuses[f"{status} {method} {target[:60]}"] += 1
        conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return statuses


# --------------------------------------------------------------------------- main


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(args: argparse.Namespace, url: str, pid: int) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    uuids = await seed(host, int(port), args.seed_containers)
    cpu = cpu_seconds(pid)
    tally = await run_clients(host, int(port), uuids, args.clients, args.seconds, args.think)
    cpu = cpu_seconds(pid) - cpu
    print(
        tally.line(f"clients ({args.clients}, think {args.think:g}s)", args.seconds)
        + f"; server CPU {cpu * 1000 / max(1, tally.requests):.2f} ms per request",
        flush=True,
    )
    if args.slow:
        tally, outcome = await run_slow(
            host, int(port), uuids, args.slow, args.clients, args.seconds, args.think
        )
        print(tally.line(f"clients ({args.clients}) beside {args.slow} slow", args.seconds))
        print(f"slow clients: {dict(outcome)}", flush=True)
    if args.random:
        started = time.monotonic()
        statuses = await run_random(host, int(port), uuids, args.random, args.random_concurrency)
        took = time.monotonic() - started
        print(f"random ({args.random} in {took:.0f}s): {dict(sorted(statuses.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean seconds a client waits between requests (exponential); 0: back to back",
    )
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--random", type=int, default=100_000)
    parser.add_argument("--random-concurrency", type=int, default=50)
    parser.add_argument("--seed-containers", type=int, default=200)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="the server's api.request_timeout for this run",
    )
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="herder-api-load-"))
    proc, url = start_server(data_dir, args.request_timeout)
    try:
        asyncio.run(main_async(args, url, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
