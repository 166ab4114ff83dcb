"""memllm serve: one process per home that keeps models and memories loaded for every client.

    <runtime dir>/memllm/serve-<home hash>.sock   the Unix socket (0600 in a 0700 folder), where
                                                  the CLI looks for a server of its home
    <home>/serve.lock, serve.json                 held while serving (a second server refuses),
                                                  and who serves (pid, socket, TCP address)

TCP is added with --host/--port: loopback needs nothing more; any other address refuses to
start without an API key (MEMLLM_API_KEY, or --api-key-file with user-only permissions).
SIGTERM or Ctrl-C asks every ingest in flight to stop at its next chunk boundary and commit,
waits for the requests in flight, and removes the socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ..clock import now
from ..config import APP, Settings, private_folder
from ..errors import Busy, ConfigError, UsageError

log = logging.getLogger("memllm.serve")
GRACE_SECONDS = 30  # how long a stopping server waits for requests in flight


def socket_path(home: Path) -> Path:
    """Where a server of this home listens (MEMLLM_SOCKET overrides it)."""
    env = os.environ.get("MEMLLM_SOCKET")
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(platformdirs.user_runtime_dir(APP)) if runtime and Path(runtime).is_dir() else \
        Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    digest = hashlib.sha256(str(Path(home).expanduser().resolve()).encode()).hexdigest()[:16]
    return base / f"serve-{digest}.sock"


def api_key(file: Path | None) -> str | None:
    """The API key: from a file readable by its owner only, else MEMLLM_API_KEY."""
    if file is not None:
        try:
            mode = file.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{file} is readable by others (mode {stat.S_IMODE(mode):o})",
                                  hint=f"chmod 600 {file}")
            key = file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read the API key file {file}: {err.strerror or err}") from None
        if not key:
            raise ConfigError(f"the API key file {file} is empty")
        return key
    return os.environ.get("MEMLLM_API_KEY") or None


@dataclass
class Listen:
    socket: Path
    host: str | None = None
    port: int | None = None


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, listen: Listen, *, key: str | None = None, max_model_bytes: int | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C (blocks)."""
    import uvicorn
    from filelock import FileLock, Timeout

    from ..service.hub import Hub
    from .app import create_app

    if listen.host is not None and not loopback(listen.host) and key is None:
        raise UsageError(f"--host {listen.host} is not a loopback address: set an API key first",
                         hint="MEMLLM_API_KEY=... or --api-key-file FILE (mode 600); or --host 127.0.0.1")
    home = private_folder(Path(settings.home))
    lock = FileLock(str(home / "serve.lock"), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise Busy(f"another memllm serve serves {home} ({_owner(home)})",
                   hint="stop it first, or use another MEMLLM_HOME") from None
    try:
        sockets = [_unix_socket(listen.socket)]
        if listen.host is not None:
            sockets.append(_tcp_socket(listen.host, listen.port or 0))
        tcp = sockets[1].getsockname()[:2] if len(sockets) > 1 else None
        _write_owner(home, listen.socket, tcp)
        hub = Hub(settings, max_model_bytes=max_model_bytes)
        app = create_app(hub, api_key=key, local=lambda request: request.scope.get("server", (None, 0))[1] is None)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_SECONDS,
                                lifespan="off")
        stops = app.state.stops

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                for stop in list(stops.values()):  # ingests in flight stop at their next chunk boundary, and commit
                    stop.requested = stop.requested or "SIGTERM"
                super().handle_exit(sig, frame)

        server = Server(config)
        where = f"unix:{listen.socket}" + (f" and http://{tcp[0]}:{tcp[1]}" if tcp else "")
        print(f"memllm: serving {home} on {where} (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
        server.run(sockets=sockets)
    finally:
        with contextlib.suppress(OSError):
            listen.socket.unlink()
        with contextlib.suppress(OSError):
            (home / "serve.json").unlink()
        lock.release()


def _unix_socket(path: Path) -> socket.socket:
    """Listen on `path`, created 0600 (the umask while binding: no moment where others may
    connect). A folder memllm creates is made 0700; a folder that exists is the user's and is
    left as it is, but refused when others may write to it and it is not sticky (they could
    replace the socket)."""
    folder = path.parent
    if folder.exists():
        info = folder.stat()
        others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != os.getuid()
        if others and not info.st_mode & stat.S_ISVTX:
            raise UsageError(f"{folder} may be written by others (mode {stat.S_IMODE(info.st_mode):o}, owner uid "
                             f"{info.st_uid}): another user could replace the socket there",
                             hint="choose a folder of your own for --socket")
    else:
        private_folder(folder)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket; memllm serve never replaces it")
        path.unlink()  # a socket left by a server that was killed (we hold the home's lock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(128)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    return sock


def _write_owner(home: Path, path: Path, tcp) -> None:
    info = {"pid": os.getpid(), "since": now(), "socket": str(path),
            "http": f"http://{tcp[0]}:{tcp[1]}" if tcp else None}
    target = home / "serve.json"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _owner(home: Path) -> str:
    try:
        info = json.loads((home / "serve.json").read_text())
        return f"pid {info['pid']}, since {info['since']}, on {info['socket']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is unknown"
