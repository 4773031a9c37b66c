"""A bounded fuzz of a coordinator's public port, on loopback only: malformed TLS records, odd
HTTP requests and garbage Fleet API payloads (with forged SuperNode signatures), a fixed number of
each, seeded, and stopped at a time limit. Returns what came back, counted, for RELIABILITY.md.
"""

from __future__ import annotations

import base64
import http.client
import random
import socket
import ssl
import time
from collections import Counter
from pathlib import Path

from server.coordinator.control_proxy import FLEET_ENDPOINTS

TLS_RECORDS = 200
HTTP_REQUESTS = 300
FLEET_PAYLOADS = 500
SECONDS = 90.0
TIMEOUT = 5.0
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW")


def fuzz_public_port(port: int, ca: Path, seed: int = 12) -> dict[str, Counter]:
    """Every case against 127.0.0.1:`port`; outcome per category (status code or error)."""
    if not 1 <= port <= 65535:
        raise ValueError(port)
    rng = random.Random(seed)
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + SECONDS
    outcomes: dict[str, Counter] = {"tls": Counter(), "http": Counter(), "fleet": Counter()}
    for _ in range(TLS_RECORDS):
        if time.monotonic() > deadline:
            break
        outcomes["tls"][_raw(port, _malformed_record(rng))] += 1
    for _ in range(HTTP_REQUESTS):
        if time.monotonic() > deadline:
            break
        method, path, headers, body = _odd_request(rng)
        outcomes["http"][_request(port, context, method, path, headers, body)] += 1
    for _ in range(FLEET_PAYLOADS):
        if time.monotonic() > deadline:
            break
        path = "/v1/fleet/" + rng.choice(FLEET_ENDPOINTS)
        headers = {"content-type": "application/protobuf", **_forged_signature(rng)}
        outcomes["fleet"][_request(port, context, "POST", path, headers, _garbage(rng))] += 1
    return outcomes


def _malformed_record(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # a handshake record header claiming a length that never comes
        return bytes([0x16, 0x03, rng.randrange(5)]) + rng.randbytes(2) + rng.randbytes(20)
    if kind == 1:  # an unknown record type
        return bytes([rng.randrange(256), 0x03, 0x03, 0x00, 0x10]) + rng.randbytes(16)
    if kind == 2:  # plaintext HTTP on the TLS port
        return b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n\r\n"
    return rng.randbytes(rng.randrange(1, 2048))


def _raw(port: int, data: bytes) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
            answer = raw.recv(64)
    except TimeoutError:
        return "timeout"
    except OSError as error:
        return type(error).__name__
    if not answer:
        return "closed"
    return "tls alert" if answer[0] == 0x15 else ("http 400" if b" 400 " in answer else "other")


def _odd_request(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    paths = [
        "/v1/fleet/" + rng.choice(FLEET_ENDPOINTS),
        "/v1/control/list-runs",
        "/v1/fleet/../control/stop-run",
        "/" + "a" * rng.randrange(1, 6000),
        "/v1/fleet/%00%ff" + rng.randbytes(4).hex(),
        "/confide/site-status/" + rng.randbytes(8).hex(),
    ]
    headers = {"content-type": rng.choice(["application/protobuf", "text/plain", "x/\u00e9"])}
    if rng.random() < 0.3:
        headers["x-filler"] = "x" * rng.randrange(100, 20_000)
    body = rng.randbytes(rng.randrange(0, 65_536)) if rng.random() < 0.5 else b""
    return rng.choice(METHODS), rng.choice(paths), headers, body


def _forged_signature(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.3:
        return {}
    return {
        "flwr-public-key": base64.b64encode(rng.randbytes(rng.randrange(1, 200))).decode(),
        "flwr-signature": base64.b64encode(rng.randbytes(96)).decode(),
        "flwr-timestamp": rng.choice(["2026-01-01T00:00:00+00:00", "yesterday", "", "9" * 40]),
    }


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return b""
    if kind == 1:  # protobuf-looking: field tags and huge varint lengths
        return bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) + rng.randbytes(rng.randrange(64))
    return rng.randbytes(rng.randrange(1, 200_000))


def _request(
    port: int,
    context: ssl.SSLContext,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> str:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        return str(connection.getresponse().status)
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()
