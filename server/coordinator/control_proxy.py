"""The coordinator's front door: nginx terminates TLS and forwards only the Fleet API.

Flower 1.42's SuperLink serves the Fleet, Control and Runtime APIs (and `/docs`) on one HTTP(S)
port, and the open-source build does not authenticate the Control API: anyone who reaches that
port and trusts the CA (every invited client does) could register nodes, start, stop or list runs.
So the SuperLink listens on loopback only, and the public port belongs to nginx, which forwards
exactly the Fleet endpoints a SuperNode calls (`POST /v1/fleet/<name>`, exact matches, rewritten
to the canonical path) and answers 404 to everything else. The coordinator operator reaches the
Control API on loopback, on the coordinator machine itself.

A request body larger than what Flower ever sends is refused (413) by nginx before it reaches the
SuperLink: Flower pushes a model as separate objects, each array split into chunks of at most
5 MB (`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`), so the largest request is one chunk plus framing,
whatever the model's size. `SITE_STATUS_PREFIX` answers "invited" or "revoked" for a key's
fingerprint, so a refused site can say why (coordinator.py `write_site_status` writes the
map nginx includes; the coordinator reloads nginx when it changes).

The hop from nginx to the SuperLink is TLS too (a loopback-only certificate the coordinator makes
for itself), so nothing on this machine sees plaintext model updates either.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.processes import (
    ManagedProcess,
    ProcessError,
    child_environment,
    find_executable,
    last_error_line,
)
from common.site_keys import SITE_STATUS_PREFIX

# Every route of flwr 1.42's Fleet router (flwr/superlink/routers/fleet/router.py); a test checks
# this list against the installed Flower so an upgrade cannot silently open or close a path.
FLEET_ENDPOINTS = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
FLEET_PREFIX = "/v1/fleet/"
NGINX_HINT = (
    "install nginx (Debian/Ubuntu: `sudo apt-get install nginx-light`, or run .ci/setup-system)"
)
# The name nginx checks on the SuperLink's loopback certificate (nginx matches DNS SANs only).
UPSTREAM_TLS_NAME = "localhost"
# One 5 MB array chunk (Flower's default) plus protobuf framing, with room to spare.
DEFAULT_MAX_REQUEST_MB = 8


@dataclass(frozen=True)
class ProxySettings:
    """What the front door needs: where to listen, which identity to show, where to forward."""

    listen_host: str
    listen_port: int
    server_cert: Path | None  # None: plaintext (loopback experiments only)
    server_key: Path | None
    upstream_port: int
    upstream_ca: Path
    workdir: Path
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB
    site_status: Path | None = None  # nginx map file: key fingerprint URI -> status

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"


def _listen_address(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        return str(port)
    if host == "::":
        return f"[::]:{port} ipv6only=off"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(path: Path) -> str:
    text = str(path)
    if any(c in text for c in "\"'\\;{}\n$"):
        raise ProcessError(f"{text}: nginx cannot use this path safely; move it to a plain path")
    return f'"{text}"'


def nginx_config(settings: ProxySettings) -> str:
    """The whole nginx.conf: self-contained, so it never touches the system's nginx setup."""
    work = settings.workdir
    tls = settings.server_cert is not None and settings.server_key is not None
    listen = _listen_address(settings.listen_host, settings.listen_port) + (" ssl" if tls else "")
    tls_lines = ""
    if settings.server_cert is not None and settings.server_key is not None:
        tls_lines = f"""
        ssl_certificate {_quote(settings.server_cert)};
        ssl_certificate_key {_quote(settings.server_key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:confide:1m;"""
    locations = "\n".join(
        f"""
        location = {FLEET_PREFIX}{endpoint} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink{FLEET_PREFIX}{endpoint};
        }}"""
        for endpoint in FLEET_ENDPOINTS
    )
    status_map, status_location = "", ""
    if settings.site_status is not None:
        status_map = f"""
    map_hash_bucket_size 128;  # keys are 64-character paths
    map $uri $confide_site_status {{
        default "";
        include {_quote(settings.site_status)};
    }}
"""
        status_location = f"""

        # Why a site was refused: invited or revoked, by its key's fingerprint; nothing else.
        location ^~ {SITE_STATUS_PREFIX} {{
            limit_except GET {{ deny all; }}
            default_type text/plain;
            if ($confide_site_status = "") {{
                return 404;
            }}
            return 200 "$confide_site_status\n";
        }}"""
    return f"""# Written by `confide coordinator start`; regenerated on every start, do not edit.
worker_processes 1;
pid {_quote(work / "nginx.pid")};
error_log {_quote(work / "error.log")} warn;
events {{ worker_connections 4096; }}  # two or three connections per site

http {{
    access_log {_quote(work / "access.log")};
    client_body_temp_path {_quote(work / "tmp" / "body")};
    proxy_temp_path {_quote(work / "tmp" / "proxy")};
    fastcgi_temp_path {_quote(work / "tmp" / "fastcgi")};
    uwsgi_temp_path {_quote(work / "tmp" / "uwsgi")};
    scgi_temp_path {_quote(work / "tmp" / "scgi")};
    server_tokens off;
{status_map}
    upstream superlink {{
        server 127.0.0.1:{settings.upstream_port};
        keepalive 32;
    }}

    server {{
        listen {listen};{tls_lines}
        client_max_body_size {settings.max_request_mb}m;  # one array chunk; see the module doc

        # Every forwarded request goes to the SuperLink over loopback TLS, verified.
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_quote(settings.upstream_ca)};
        proxy_ssl_name {UPSTREAM_TLS_NAME};
        proxy_ssl_session_reuse on;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
{locations}{status_location}

        # Control API, Runtime API, /docs, /openapi.json, /health: not from the outside.
        location / {{
            return 404;
        }}
    }}
}}
"""


def check_config(nginx: Path, settings: ProxySettings) -> None:
    """`nginx -t` on the generated file, so a bad path fails before anything listens."""
    result = subprocess.run(
        [str(nginx), "-t", "-q", "-p", str(settings.workdir), "-e", str(settings.workdir / "error.log"),
         "-c", str(settings.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=child_environment(),
    )  # fmt: skip
    if result.returncode != 0:
        raise ProcessError(
            f"{settings.config_path}: nginx rejects the generated configuration: "
            f"{last_error_line(result.stderr)}"
        )


def start_proxy(settings: ProxySettings, log_path: Path) -> ManagedProcess:
    """Write the configuration, check it, and run nginx in the foreground (our child)."""
    nginx = find_executable("nginx", NGINX_HINT)
    (settings.workdir / "tmp").mkdir(parents=True, exist_ok=True)
    settings.config_path.write_text(nginx_config(settings))
    check_config(nginx, settings)
    argv = [
        nginx,
        "-p", settings.workdir,
        "-e", settings.workdir / "error.log",
        "-c", settings.config_path,
        "-g", "daemon off; master_process on;",
    ]  # fmt: skip
    return ManagedProcess("nginx (TLS front door)", argv, log_path)
