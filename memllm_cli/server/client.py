"""The CLI's client of a running `memllm serve` (same MEMLLM_HOME): over its Unix socket,
with httpx, importing neither torch nor transformers, so that `memllm ask` through a warm
server costs a process start and an HTTP request.

`connect` says whether to use one: not with --no-server or MEMLLM_NO_SERVER=1, not when the
command asks for a model, device or dtype of its own (the server has its settings), not when
no socket is there; a socket nobody answers on (a killed server) costs one line on stderr and
the command runs in-process.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import (
    Busy,
    ConfigError,
    InputError,
    MemllmError,
    MemoryNotFound,
    ModelError,
    StoreError,
    Ungrounded,
    UsageError,
)

BY_EXIT = {2: UsageError, 3: InputError, 4: MemoryNotFound, 5: ModelError, 6: StoreError, 7: Busy, 8: Ungrounded}


class ServerGone(MemllmError):
    """The server stopped answering in the middle of a request."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the server stopped answering: {why}", hint="memllm --no-server runs in-process")


def connect(options: dict, no_server: bool = False) -> Remote | None:
    """A client of the server of this invocation's home, or None: run in-process."""
    if no_server or os.environ.get("MEMLLM_NO_SERVER", "") not in ("", "0"):
        return None
    if any(options.get(k) for k in ("model", "device", "dtype")):
        return None  # the server runs its own model settings
    from ..config import load_settings
    from . import socket_path

    try:
        settings = load_settings(memory=options.get("memory"))
    except ConfigError:
        return None  # in-process reports it
    path = socket_path(settings.home)
    if not path.exists():
        return None
    remote = Remote(path, settings.memory)
    if not remote.alive():
        print(f"memllm: no server answers at {path} (stopped or killed); running in-process", file=sys.stderr)
        return None
    return remote


class Remote:
    def __init__(self, path: Path, memory: str) -> None:
        import httpx

        self.path, self.memory = path, memory
        self.httpx = httpx
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://memllm",
                                 timeout=httpx.Timeout(None, connect=5.0))

    def alive(self) -> bool:
        try:
            return self.http.get("/v1/models", timeout=5.0).status_code == 200
        except self.httpx.HTTPError:
            return False

    def url(self, what: str) -> str:
        return f"/api/memories/{self.memory}/{what}"

    def status(self) -> dict:
        return self._json(self._call("GET", self.url("status")))

    def ingest(self, paths: list[str], *, stdin: bytes | None = None, name: str | None = None,
               force: bool = False, sync: bool = False) -> RemoteReport:
        """`memllm ingest` on the server: paths made absolute here (the server reads them, over
        the local socket only), stdin sent as bytes. `stop` asks it to stop at a chunk boundary."""
        here = os.getcwd()
        absolute = [p if p == "-" else os.path.join(here, os.path.expanduser(p)) for p in paths]
        self.ingest_id = f"cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        body = {"paths": absolute, "name": name, "force": force, "sync": sync, "id": self.ingest_id,
                "stdin_base64": base64.b64encode(stdin).decode() if stdin is not None else None}
        return RemoteReport(self._json(self._call("POST", self.url("ingest"), json=body)))

    def stop(self, signal_name: str) -> None:
        """Ask the running ingest to stop at its next chunk boundary (from a signal handler:
        on a connection of its own)."""
        with self.httpx.Client(transport=self.httpx.HTTPTransport(uds=str(self.path)), base_url="http://memllm",
                                timeout=5.0) as other:
            try:
                other.post(f"/api/ingests/{self.ingest_id}/stop", json={"signal": signal_name})
            except self.httpx.HTTPError:
                pass  # the ingest ended meanwhile, or the server went: the answer says which

    def ingest_text(self, name: str, text: str) -> dict:
        body = {"documents": [{"name": name, "text": text}]}
        return self._json(self._call("POST", self.url("ingest"), json=body))

    def forget(self, sources: list[str]) -> dict:
        return self._json(self._call("POST", self.url("forget"), json={"sources": sources}))

    def ask(self, question: str, **options) -> RemoteAnswer:
        body = {"question": question, "stream": True, **{k: v for k, v in options.items() if v is not None}}
        return RemoteAnswer(self, body)

    def _call(self, method: str, url: str, **kwargs):
        try:
            return self.http.request(method, url, **kwargs)
        except self.httpx.HTTPError as err:
            raise ServerGone(str(err)) from None

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
        try:
            with remote.http.stream("POST", remote.url("ask"), json=self._body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_error(response.json())
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "piece" in event:
                        self.text += event["piece"]
                        yield event["piece"]
                    elif "done" in event:
                        self._done = event["done"]
        except remote.httpx.HTTPError as err:
            raise ServerGone(str(err)) from None
        if self._done is None:
            raise ServerGone("the answer was cut short")
        self.info = {k: v for k, v in self._done.items()
                     if k not in ("answer", "tokens", "seconds", "first_token_seconds")}

    @property
    def grounded(self) -> bool | None:
        return self.info.get("grounded")

    def to_dict(self) -> dict:
        return dict(self._done or {})
