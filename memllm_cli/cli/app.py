"""The `memllm` application: global options, and the one place errors become exit codes.

Commands (commands.py, bench.py) parse flags, make one call into the service and render
the result (render.py). Whatever they raise is translated by `run()` through ERRORS into
one line on stderr and the exit code docs/cli.md documents; a traceback only with
MEMLLM_DEBUG=1. The engine (and torch) is imported inside the commands, so `memllm --help`
starts fast.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated

import typer

from .. import __version__
from ..errors import MemllmError, UsageError
from .render import err

app = typer.Typer(
    name="memllm",
    help="Give a language model a memory that keeps learning (MemoryLLM).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
INTERRUPTED = "interrupted; the memory keeps its last committed state"
TERMINATED = "terminated; the memory keeps its last committed state"


class Terminated(BaseException):
    """SIGTERM, or SIGHUP (the terminal closed): unwinds like Ctrl-C (every `finally` runs:
    temp files, the lock), and the exit code is 128 + the signal's number, as a shell reports."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


STOPPING = (signal.SIGTERM, signal.SIGHUP)  # what stops memllm like SIGTERM (SIGINT: Ctrl-C)


def stopping_signals() -> list[int]:
    """SIGINT and the STOPPING signals this process may handle: one that its parent ignores
    (nohup ignores SIGHUP) stays ignored."""
    return [s for s in (signal.SIGINT, *STOPPING) if signal.getsignal(s) is not signal.SIG_IGN]


def exit_for(signal_name: str) -> int:
    """The exit code of a command a signal stopped: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + signal.Signals[signal_name] if signal_name in signal.Signals.__members__ else EXIT_TERMINATED


def _on_sigterm(signum, frame) -> None:
    raise Terminated(signum)


def _version_callback(value: bool) -> None:
    if value:
        print(f"memllm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    memory: Annotated[
        str | None, typer.Option("--memory", "-m", help="Memory to use [env: MEMLLM_MEMORY; default: default].")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model: smollm2-135m-instruct (embedded), a directory, a .gguf file, ollama:NAME[:TAG] or a hub id "
            "[env: MEMLLM_MODEL; default: the memory's own model].",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:N, or auto (several GPUs: an accelerate device map) "
                     "[env: MEMLLM_DEVICE; default: cpu]."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, bfloat16 or float16 [env: MEMLLM_DTYPE; default: float32 on the "
                     "CPU, bfloat16 for MemoryLLM checkpoints on a GPU]."),
    ] = None,
    no_server: Annotated[
        bool, typer.Option("--no-server", envvar="MEMLLM_NO_SERVER", help="Run in this process even when a memllm "
                           "serve of the same MEMLLM_HOME is running [env: MEMLLM_NO_SERVER=1].")
    ] = False,
    _: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """memllm writes text into a fixed-size latent memory inside every layer of a language
    model, and answers questions from it. Memories live under MEMLLM_HOME. When `memllm serve`
    runs for the same MEMLLM_HOME, ask and status go through it (models stay loaded).
    The options below may also come after the command: memllm ask --no-server -m work "..."."""
    ctx.obj = {"memory": memory, "model": model, "device": device, "dtype": dtype}
    ctx.meta["no_server"] = no_server
    _log_to_stderr()


def backend(ctx: typer.Context, **options):
    """The back-end for this invocation (server/backends.py): the running server of this home
    when the command may go through it, else this process; it falls back once by itself."""
    from ..server.backends import Chosen

    return Chosen({**ctx.obj, **options}, ctx.meta.get("no_server", False))


def service(ctx: typer.Context, **options):
    """The service for this invocation's global options (and a command's own settings)."""
    from ..service import Memllm

    return Memllm(**ctx.obj, **options)


# -- errors -----------------------------------------------------------------------------

Report = tuple[str, str | None, int]  # message, hint, exit code


def _domain(e: MemllmError) -> Report:
    return e.message, e.hint, e.exit_code


def _usage(e: typer.TyperException) -> Report:
    e.show()  # click's own usage message (typer vendors click), as it prints it
    return "", None, getattr(e, "exit_code", 2)


def _file_system(e: OSError) -> Report:  # the disk, not memllm: full, read-only, no permission, closed stdout
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}", None, 1


def _aborted(e: typer.Abort) -> Report:  # end of input at a prompt
    return "aborted; nothing was changed", None, 1


def _interrupted(e: KeyboardInterrupt) -> Report:
    return INTERRUPTED, None, EXIT_INTERRUPTED


def _terminated(e: Terminated) -> Report:
    return TERMINATED.replace("terminated", f"stopped by {signal.Signals(e.signum).name}") \
        if e.signum != signal.SIGTERM else TERMINATED, None, 128 + e.signum


def _bug(e: Exception) -> Report:
    return (f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "this is a bug in memllm: please report it with the output of MEMLLM_DEBUG=1", 1)


# The one table: the first class that matches decides the message and the exit code.
ERRORS: list[tuple[type[BaseException], Callable[..., Report]]] = [
    (MemllmError, _domain),
    (typer.TyperException, _usage),
    (typer.Abort, _aborted),
    (KeyboardInterrupt, _interrupted),
    (Terminated, _terminated),
    (OSError, _file_system),
    (Exception, _bug),
]


class ReaderGone(Exception):
    """The reader of stdout went away (memllm ... | head -1)."""


class _Stdout:
    """sys.stdout, with a closed pipe turned into ReaderGone: typer would report it as an
    error (exit 1); a pipe's reader leaving early is how `| head` works."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise ReaderGone() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise ReaderGone() from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


# the global options (main's), and whether each takes a value: accepted after the command too
GLOBAL_OPTIONS = {"--memory": True, "-m": True, "--model": True, "--device": True, "--dtype": True,
                  "--no-server": False}


def hoist_global_options(argv: list[str], group=None) -> list[str]:
    """`memllm ask --no-server Q` as `memllm --no-server ask Q`: global options written after the
    command move before it, unless the command has an option of that name itself
    (`snapshot create -m MESSAGE`). Values of the command's own options are never taken for one."""
    group = group or typer.main.get_command(app)  # click's objects (typer's own copy of click: duck-typed)
    start = 0
    while start < len(argv) and argv[start].startswith("-") and argv[start] != "--":  # globals before the command
        name = argv[start].split("=", 1)[0]
        start += 1 + (GLOBAL_OPTIONS.get(name, False) and "=" not in argv[start])
    command, end = group, start
    while hasattr(command, "commands") and end < len(argv) and argv[end] in command.commands:
        command, end = command.commands[argv[end]], end + 1
    if command is group:
        return argv
    own = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    valued = {opt for p in command.params if p.param_type_name == "option" and not p.is_flag and not p.count
              for opt in p.opts}
    moved, rest, i = [], [], end
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token == "--":
            rest += argv[i:]
            break
        hoisted = name in GLOBAL_OPTIONS and name not in own
        if hoisted and GLOBAL_OPTIONS[name] and "=" not in token and i + 1 == len(argv):
            raise UsageError(f"option {name} needs a value")
        width = 2 if "=" not in token and i + 1 < len(argv) and (
            name in valued or (hoisted and GLOBAL_OPTIONS[name])) else 1
        (moved if hoisted else rest).extend(argv[i:i + width])
        i += width
    return argv[:start] + moved + argv[start:end] + rest


def run(argv: list[str] | None = None) -> None:
    """The entry point: run the app, translate what escapes it, exit."""
    debug = os.environ.get("MEMLLM_DEBUG") == "1"
    if sys.stdout is None:  # started with stdout closed (>&-): results would vanish
        err("memllm: error: standard output is closed; redirect it to a file or /dev/null instead")
        sys.exit(1)
    sys.stdout = _Stdout(sys.stdout)
    if threading.current_thread() is threading.main_thread():
        for signum in stopping_signals():
            if signum != signal.SIGINT:
                signal.signal(signum, _on_sigterm)
    try:
        command = typer.main.get_command(app)  # built once (about 30 ms): for the options, then to run
        code = command(args=hoist_global_options(sys.argv[1:] if argv is None else list(argv), command),
                       prog_name="memllm", standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as raised:  # the edge: every error ends here, as one line
        if debug:
            raise
        if isinstance(raised, (ReaderGone, BrokenPipeError)):
            _reader_gone()
        raised = _signal_in(raised)
        handler = next((h for kind, h in ERRORS if isinstance(raised, kind)), None)
        if handler is None:
            raise
        message, hint, code = handler(raised)
        if message:
            err(f"memllm: error: {message}")
        if hint:
            err(f"memllm: hint: {hint}")
        _exit(code)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code, after unwinding the command
        err(f"memllm: error: {INTERRUPTED}")
    _exit(code if isinstance(code, int) else 0)


def _signal_in(raised: BaseException) -> BaseException:
    """The Ctrl-C or SIGTERM behind an error, if one caused it: a signal that lands while a
    library imports a module comes back as that library's import error (transformers turns it
    into "Could not import module ..."), and is still the user stopping memllm."""
    seen, cause = set(), raised
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return raised


def _exit(code: int) -> None:
    if code == EXIT_INTERRUPTED or code in (128 + s for s in STOPPING):
        # Every `finally` below (temp files, the lock) has run by now. Leave at once: under
        # load, a SIGINT-killed status (-2) instead of 130 was seen when unwinding further.
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _reader_gone() -> None:
    """Stop quietly with exit 0, as a pipe expects."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit: let that go nowhere
    sys.exit(0)


def _log_to_stderr() -> None:
    import logging

    logger = logging.getLogger("memllm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("memllm: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
