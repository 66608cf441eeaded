"""The ``plugtron`` command line. Sub-commands live in sibling modules and
import torch only when they need it (``plugtron plugins`` never does)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn, Sequence

from plugtron.errors import PluginError, PlugtronError


def _extra_plugins(argv: Sequence[str]) -> list[str]:
    """``-p MODULE`` values, needed before parsing so their commands exist."""
    found, args = [], list(argv)
    for index, arg in enumerate(args):
        if arg in ("-p", "--plugin") and index + 1 < len(args):
            found.append(args[index + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def _parser(pm) -> argparse.ArgumentParser:  # noqa: ANN001
    from plugtron.cli import build_cmd, plugins_cmd

    parser = argparse.ArgumentParser(prog="plugtron", description="model-family plugins for megatron-core")
    parser.add_argument(
        "-p", "--plugin", action="append", default=[], metavar="MODULE",
        help="also register this importable module as a plugin (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plugins_cmd.add_parser(commands)
    build_cmd.add_parser(commands)
    pm.hooks.add_commands(commands)
    return parser


def positive_int(text: str) -> int:
    """argparse type for sizes and counts: ``--tp 0`` is refused by the parser, naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and a non-zero exit code.

    Exit codes: 0 success, 1 a check failed or an unexpected error, 2 bad input
    (a :class:`PlugtronError`: the message names the file, field or plugin),
    128+N a signal. ``PLUGTRON_DEBUG=1`` adds the traceback.
    """
    from plugtron.runtime.launcher import private_tmpdir

    argv = list(sys.argv[1:] if argv is None else argv)
    with _signals_as_exits(), private_tmpdir():
        try:
            pm = _manager(_extra_plugins(argv))
            args = _parser(pm).parse_args(argv)
            args.argv = argv  # what a multi-rank command re-runs on each rank (not sys.argv: main may be called in-process)
            return int(args.run(args) or 0)
        except PlugtronError as exc:
            return _fail(exc, 2)
        except KeyboardInterrupt:
            return 130
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the last line of defence (torch's CheckpointException
            return _fail(exc, 1)      # is a BaseException): one line, not a traceback


_command_process = False


def run() -> NoReturn:
    """The ``plugtron`` console script and ``python -m plugtron.cli`` (each rank): one command, then :func:`leave`."""
    global _command_process
    _command_process = True
    leave(main())


def is_command_process() -> bool:
    """Whether this process was started to run one command (:func:`run`), not a program calling :func:`main`."""
    return _command_process


def leave(code: int) -> NoReturn:
    """Exit with ``code``: exit handlers run and streams are flushed, the interpreter is not torn down.

    Why: after torch and megatron-core, tearing the interpreter down means
    deallocating millions of objects one by one: 0.18-0.2 s after every
    converting command here (a 250M export at TP=1 or TP=2, where each rank's
    teardown is on the command's critical path), for nothing, as the process
    ends. Everything a command writes is closed by then (atomic writers,
    ``with`` blocks); ``atexit`` handlers (logging's, thread pools', a
    plugin's) still run.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def terminate(signum: int, frame: object) -> None:
    """SIGTERM / SIGHUP as an exception: atomic writers remove their temp dirs, the launcher's TMPDIR goes."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_as_exits() -> Iterator[None]:
    """While a command runs: SIGTERM and SIGHUP raise SystemExit (see :func:`terminate`), and SIGXFSZ
    is ignored: past a file size limit (ulimit -f) the kernel would kill the writer before any cleanup;
    ignored, the write fails with EFBIG and the atomic writers remove their temp files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {signal.SIGTERM: terminate, signal.SIGHUP: terminate, signal.SIGXFSZ: signal.SIG_IGN}
    previous = {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _cause(exc: BaseException) -> BaseException:
    """The exception that says why: torch's distributed checkpoint wraps each rank's in ``failures``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return _cause(inner)
    return exc


def one_line(exc: BaseException) -> str:
    """The error as one line: PlugtronErrors as they are; others with their type, and the file for OSErrors."""
    exc = _cause(exc)
    if isinstance(exc, PlugtronError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        names = [name for name in (exc.filename, exc.filename2) if name is not None]
        text = f"{': '.join(map(str, names))}: {exc.strerror}" if names else f"{type(exc).__name__}: {exc.strerror}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [lines[0], lines[-1]]  # torch's CheckpointException carries a whole traceback: keep what and why
    return " | ".join(lines) or type(exc).__name__


def _fail(exc: BaseException, code: int) -> int:
    from plugtron.runtime.launcher import report_error

    if os.environ.get("PLUGTRON_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    hint = "" if isinstance(exc, PlugtronError) or os.environ.get("PLUGTRON_DEBUG") else " (PLUGTRON_DEBUG=1 shows where)"
    report_error(f"plugtron: error: {one_line(exc)}{hint}")
    return code


def _manager(extra: Sequence[str]):  # noqa: ANN202 - avoids importing the manager type eagerly
    from plugtron.manager import get_plugin_manager

    pm = get_plugin_manager()
    for module in extra:
        if module not in pm.records:
            try:
                pm.register(module, name=module)
            except PlugtronError:
                raise
            except Exception as exc:  # noqa: BLE001 - a -p module is the user's code: name it, whatever it raised
                raise PluginError(f"-p {module}: cannot load this plugin module: {one_line(exc)}") from exc
    return pm


def manager_for(args: argparse.Namespace):  # noqa: ANN201
    """The manager with the ``-p`` plugins of this command line registered."""
    return _manager(args.plugin)


if __name__ == "__main__":
    sys.exit(main())
