"""memllm serve and memllm mcp: memllm for other programs."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .render import disk_size, err


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Also listen on TCP at this address (127.0.0.1: "
                                             "loopback; any other address needs an API key) [default with "
                                             "--port: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="Also listen on this TCP port, on "
                                             "--host or loopback (0: any free port; the address is printed at "
                                             "start) [default with --host: 8420].")] = None,
    socket: Annotated[Path | None, typer.Option("--socket", help="The Unix socket [env: MEMLLM_SOCKET; default: "
                                                "in the user's runtime dir, one per MEMLLM_HOME].")] = None,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="A file (mode 600) holding the API key "
                                                      "TCP clients must send as 'Authorization: Bearer KEY' "
                                                      "[env: MEMLLM_API_KEY].")] = None,
    max_model_ram: Annotated[str | None, typer.Option("--max-model-ram", metavar="SIZE", help="Unload the least "
                                                      "recently used models past this much RAM of weights "
                                                      "(e.g. 8GB) [default: no limit].")] = None,
) -> None:
    """Keep models and memories loaded for every client: the memllm CLI, any OpenAI client
    (/v1/chat/completions, each memory a model 'memllm/NAME') and memllm's JSON API
    (/api/..., documented at /docs). Runs in the foreground; one line per request on stderr.

    Examples:
      memllm serve
      memllm serve --port 8420              (and http://127.0.0.1:8420/v1 for OpenAI clients)
      MEMLLM_API_KEY=... memllm serve --host 0.0.0.0
    """
    from ..config import load_settings
    from ..server import Listen, api_key, socket_path
    from ..server import serve as run_server

    settings = load_settings(**{k: v for k, v in ctx.obj.items() if v is not None})
    key = api_key(api_key_file)
    if port is not None and host is None:
        host = "127.0.0.1"  # a bare --port means loopback, as ollama and llama-server do
    listen = Listen(socket or socket_path(settings.home), host, (8420 if port is None else port) if host else None)
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn stops gracefully, then passes the signal on: no error then
        signal.signal(sig, lambda signum, frame: None)
    run_server(settings, listen, key=key, max_model_bytes=disk_size(max_model_ram))
    err("memllm: stopped")


@app.command()
def mcp(ctx: typer.Context) -> None:
    """Serve a memory to agents over the Model Context Protocol (stdin/stdout), with the tools
    remember, recall, forget and status. Uses a running memllm serve of the same home, else
    runs in this process. For Claude Desktop and editors: command "memllm", args ["mcp"]
    (and "-m", "NAME" for another memory).

    Examples:
      memllm mcp
      memllm -m work mcp
    """
    from ..server.mcp import run as run_mcp

    run_mcp(ctx.obj, ctx.meta.get("no_server", False))
