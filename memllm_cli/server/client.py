"""The CLI's client of a running `memllm serve` (same MEMLLM_HOME): over its Unix socket,
with the standard library's http.client, importing neither torch nor transformers, so that
`memllm ask` through a warm server costs a process start and an HTTP request. (httpx took
a quarter of a second to import and to build its client's TLS context, which a Unix socket
never uses: more than the server took to answer.)

`connect` says whether to use one: not with --no-server or MEMLLM_NO_SERVER=1, not when the
command asks for a model, device or dtype of its own (the server has its settings), not when
no socket is there; a socket nobody answers on (a killed server) costs one line on stderr and
the command runs in-process.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, MemllmError, by_exit_code
from ..progress import Progress, Stop

CONNECT_SECONDS = 5.0
WIRE_ERRORS = (OSError, http.client.HTTPException)  # socket.timeout is an OSError
BY_EXIT = by_exit_code()  # the server's answers carry the exit code: the same class is raised here


class ServerGone(MemllmError):
    """The server stopped answering in the middle of a request."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the server stopped answering: {why}", hint="memllm --no-server runs in-process")


def connect(options: dict, no_server: bool = False) -> Remote | None:
    """A client of the server of this invocation's home, or None: run in-process."""
    if no_server or os.environ.get("MEMLLM_NO_SERVER", "") not in ("", "0"):
        return None
    if any(options.get(k) is not None for k in ("model", "device", "dtype", "max_disk")):
        return None  # the server runs its own model settings (and disk budget)
    from ..config import NAME, load_settings
    from . import socket_path

    try:
        settings = load_settings(memory=options.get("memory"))
    except ConfigError:
        return None  # in-process reports it
    path = socket_path(settings.home)
    if not path.exists() or not NAME.match(settings.memory):
        return None  # no server; or a memory name in-process refuses with the store's own message
    remote = Remote(path, settings.memory)
    if not remote.alive():
        print(f"memllm: no server answers at {path} (stopped or killed); running in-process", file=sys.stderr)
        return None
    return remote


class Response:
    """A response read whole: status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.body = status, body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise ServerGone(f"an answer that is not JSON (HTTP {self.status_code})") from None


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket: `timeout` bounds connecting and, where given, reading."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        super().__init__("memllm", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_SECONDS if self.timeout is None else self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)  # None: an ingest or an answer may take minutes
        self.sock = sock

    def send_request(self, method: str, url: str, body: dict | None) -> http.client.HTTPResponse:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.request(method, url, body=data, headers=headers)
        return self.getresponse()


class Remote:
    """Requests to the server, each on a connection of its own (a Unix socket connects in a
    tenth of a millisecond; a kept-alive one could have been closed by the server meanwhile)."""

    def __init__(self, path: Path, memory: str) -> None:
        self.path, self.memory = path, memory
        self.ingest_id: str | None = None  # of the last ingest sent, for `stop`

    def request(self, method: str, url: str, body: dict | None = None, timeout: float | None = None) -> Response:
        """One request answered whole; `timeout` bounds each read (None: as long as it takes)."""
        connection = UnixConnection(self.path, timeout)
        try:
            response = connection.send_request(method, url, body)
            return Response(response.status, response.read())
        finally:
            connection.close()

    def alive(self) -> bool:
        try:
            return self.request("GET", "/v1/models", timeout=CONNECT_SECONDS).status_code == 200
        except WIRE_ERRORS:
            return False

    def url(self, what: str) -> str:
        return f"/api/memories/{self.memory}/{what}"  # a plain name: connect checks it (config.NAME)

    def status(self) -> dict:
        return self._json(self._call("GET", self.url("status")))

    def ingest(self, paths: list[str], *, stdin: BinaryIO | None = None, name: str | None = None,
               force: bool = False, sync: bool = False, progress: Progress | None = None,
               stop: Stop | None = None) -> RemoteReport:
        """`memllm ingest` on the server (Memllm.ingest's parameters): paths made absolute here
        (the server reads them, over the local socket only), standard input read here and sent
        as bytes; a request to `stop` is passed on to the server (it stops at a chunk boundary
        and commits). The server reports no progress."""
        here = os.getcwd()
        absolute = [p if p == "-" else os.path.join(here, os.path.expanduser(p)) for p in paths]
        data = stdin.read() if "-" in paths and stdin is not None else None
        body = {"paths": absolute, "name": name, "force": force, "sync": sync,
                "stdin_base64": base64.b64encode(data).decode() if data is not None else None}
        return RemoteReport(self._ingest(body, stop))

    def _ingest(self, body: dict, stop: Stop | None) -> dict:
        self.ingest_id = f"cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if stop is not None:
            stop.forward, stop.armed = self.stop, True
        try:
            return self._json(self._call("POST", self.url("ingest"), {**body, "id": self.ingest_id}))
        finally:
            if stop is not None:
                stop.forward, stop.armed = None, False

    def stop(self, signal_name: str) -> None:
        """Ask the running ingest to stop at its next chunk boundary (from a signal handler:
        on a connection of its own)."""
        if self.ingest_id is None:
            return
        try:
            self.request("POST", f"/api/ingests/{self.ingest_id}/stop", {"signal": signal_name},
                         timeout=CONNECT_SECONDS)
        except WIRE_ERRORS:
            pass  # the ingest ended meanwhile, or the server went: the answer says which

    def ingest_text(self, name: str, text: str, *, force: bool = False, stop: Stop | None = None) -> RemoteReport:
        """One document's text written on the server (Memllm.ingest_text's parameters)."""
        return RemoteReport(self._ingest({"documents": [{"name": name, "text": text}], "force": force}, stop))

    def forget(self, sources: list[str], *, purge: bool = False) -> dict:
        return self._json(self._call("POST", self.url("forget"), {"sources": sources, "purge": purge}))

    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, budget: int | None = None) -> RemoteAnswer:
        """The answer streamed from the server (Memllm.ask's parameters; the API calls the
        first `max_tokens`, as OpenAI's does)."""
        options = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                   "seed": seed, "budget": budget}
        body = {"question": question, "stream": True, **{k: v for k, v in options.items() if v is not None}}
        return RemoteAnswer(self, body)

    def _call(self, method: str, url: str, body: dict | None = None) -> Response:
        try:
            return self.request(method, url, body)
        except WIRE_ERRORS as err:
            raise ServerGone(str(err) or type(err).__name__) from None

    @staticmethod
    def _json(response) -> dict:
        data = response.json()
        if response.status_code >= 400:
            raise_error(data)
        return data


def raise_error(data: dict):
    error = data.get("error", {}) if isinstance(data, dict) else {}
    raise BY_EXIT.get(error.get("code"), MemllmError)(error.get("message", "the server failed"), hint=error.get("hint"))


class RemoteReport(dict):
    """An ingest report from the server, read like service.session.IngestReport."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return dict(self)


class RemoteAnswer:
    """An answer streamed from the server, with the interface of service.session.Answer."""

    def __init__(self, remote: Remote, body: dict) -> None:
        self._remote, self._body = remote, body
        self.info: dict = {}
        self.text = ""
        self._done: dict | None = None

    def __iter__(self) -> Iterator[str]:
        remote = self._remote
        connection = UnixConnection(remote.path)
        try:
            response = connection.send_request("POST", remote.url("ask"), self._body)
            if response.status >= 400:
                raise_error(Response(response.status, response.read()).json())
            for raw in response:  # server-sent events, a line each
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "piece" in event:
                    self.text += event["piece"]
                    yield event["piece"]
                elif "done" in event:
                    self._done = event["done"]
        except WIRE_ERRORS as err:
            raise ServerGone(str(err) or type(err).__name__) from None
        finally:
            connection.close()  # a client that stops reading ends the answer: the server stops generating
        if self._done is None:
            raise ServerGone("the answer was cut short")
        self.info = {k: v for k, v in self._done.items()
                     if k not in ("answer", "tokens", "seconds", "first_token_seconds")}

    @property
    def grounded(self) -> bool | None:
        return self.info.get("grounded")

    def to_dict(self) -> dict:
        return dict(self._done or {})
