"""``agentsight-middleware``: the command line.

Each subcommand is an entry of :data:`SUBCOMMANDS`: a one-line help, a function that adds
its arguments to its parser, and a function that runs it and returns the exit code.
Exit codes: 0 done, 1 the command failed (a missing or unusable events file, an unwritable
output), 2 a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ._report import (
    DIMENSIONS,
    NO_ENVIRONMENT,
    build_report,
    format_text,
    parse_environment,
    parse_since,
    render_html,
)
from ._store import DEFAULT_PATH, StoreError

__all__ = ["PROG", "SUBCOMMANDS", "Subcommand", "main"]

PROG = "agentsight-middleware"


class Subcommand(NamedTuple):
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- report


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _environment(text: str) -> str | None:
    try:
        return parse_environment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _ByAction(argparse.Action):
    """``--by page --by hour`` and ``--by page,hour`` both add to one ordered list."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        chosen: list[str] = list(getattr(namespace, self.dest) or [])
        for name in str(values).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in DIMENSIONS:
                parser.error(
                    f"argument --by: unknown breakdown {name!r} "
                    f"(choose from {', '.join(DIMENSIONS)})"
                )
            if name not in chosen:
                chosen.append(name)
        setattr(namespace, self.dest, chosen)


def _configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=DEFAULT_PATH,
        help=f"the events file the middleware writes (default: {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        type=_since,
        help="only events from then on: a duration back from now (7d, 24h, 30m) "
        "or a UTC date (2026-11-01)",
    )
    parser.add_argument(
        "--by",
        metavar="NAME",
        action=_ByAction,
        help=f"breakdowns to show, repeatable or comma separated: {', '.join(DIMENSIONS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--environment",
        metavar="NAME",
        type=_environment,
        help="only events of this AgentSight environment: production, development (or prod, "
        f"dev), or {NO_ENVIRONMENT} for events recorded without one (default: all, and the "
        "report says when they mix)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    parser.add_argument(
        "--html",
        metavar="FILE",
        help="also write the report as one self-contained HTML page with charts",
    )


def _refuse_planted_link(path: str) -> None:
    """A ValueError for a symlink another user owns in a folder others may write to (a
    link planted in /tmp), the file's or one of its folders': the kernel refuses to
    follow one (``fs.protected_symlinks``), and resolving it here must not do what the
    kernel would not."""
    import stat

    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:
        return  # Windows: no such links to plant
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts) + 1):
        here = os.sep.join(parts[:end])
        try:
            link = os.lstat(here)
            if not stat.S_ISLNK(link.st_mode):
                continue
            folder = os.stat(os.path.dirname(here))
        except OSError:
            return
        if link.st_uid in (geteuid(), folder.st_uid):
            continue
        if folder.st_mode & stat.S_IWOTH and folder.st_mode & stat.S_ISVTX:
            raise ValueError(
                f"{here} is a symbolic link another user owns, in a folder everyone may write to"
            )


def _write_html(path: str, page: str) -> None:
    _refuse_planted_link(path)
    # Through a symlink (into a web root, say) to its target, not over the link itself.
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as existing:
            head = existing.read(16)
    except OSError:
        head = b""
    if head == b"SQLite format 3\x00":
        # `report --html agentsight-events.sqlite3` (--html taken as a flag) once replaced
        # the events file with the page.
        raise ValueError("it is an SQLite database (the events file?), not a page")
    # Written beside the target then renamed: a browser tab reloading it never sees half.
    # A new file of an unguessable name, never through a link (the folder may be shared).
    import secrets

    temporary = f"{path}.tmp{os.getpid()}.{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    # O_BINARY: os.open gives Windows a text-mode descriptor, whose "\n" the C library
    # turns into "\r\n" after the text layer did (open(path, "w") never had it).
    flags |= getattr(os, "O_BINARY", 0)
    try:
        with open(os.open(temporary, flags, 0o666), "w", encoding="utf-8") as file:
            file.write(page)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _run_report(args: argparse.Namespace) -> int:
    by = args.by if args.by else list(DIMENSIONS)
    try:
        report = build_report(args.db, since=args.since, by=by, environment=args.environment)
    except (StoreError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if args.html:
        try:
            _write_html(args.html, render_html(report))
        except OSError as exc:
            return _fail(f"cannot write {args.html}: {exc.strerror or exc}")
        except ValueError as exc:
            return _fail(f"will not write {args.html}: {exc}")
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_text(report))
    if args.html:
        print(f"HTML report written to {args.html}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- send


def _configure_send(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=DEFAULT_PATH,
        help=f"the events file to replay (default: {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="AgentSight API key (default: AGENTSIGHT_API_KEY)",
    )
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="API base URL (default: AGENTSIGHT_API_ENDPOINT or https://api.agentsight.io)",
    )


def _run_send(args: argparse.Namespace) -> int:
    from ._credentials import Credentials, in_clear_warning
    from ._replay import ReplayBusyError, replay

    try:
        credentials = Credentials.resolve(
            api_key=args.api_key,
            endpoint=args.endpoint,
            environment=None,
            names=("--api-key", "--endpoint"),
            # Each stored body keeps the environment it was recorded with: send never
            # uses AGENTSIGHT_ENVIRONMENT, so a value it cannot use must not stop it.
            read_environment=False,
        )
    except ValueError as exc:
        return _fail(str(exc))
    if credentials is None:
        return _fail("no API key: set AGENTSIGHT_API_KEY or pass --api-key")
    if credentials.in_clear:
        where = "--endpoint" if args.endpoint is not None else "AGENTSIGHT_API_ENDPOINT"
        print(f"{PROG}: warning: {in_clear_warning(credentials, where)}", file=sys.stderr)
    try:
        summary = replay(args.db, credentials, progress=sys.stderr)
    except (StoreError, ReplayBusyError, FileNotFoundError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # the lock file beside it, in a folder this user cannot write
        return _fail(f"cannot send {args.db}: {exc.strerror or exc} ({exc.filename or args.db})")
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        _fail("stopped at once: run send again (an event accepted this very moment may go twice)")
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a return: the senders still waiting for answers would hold the exit for up
        # to their 15 s timeout.
        os._exit(130)
    line = f"sent {summary.sent}, skipped {summary.skipped} (sent before), failed {summary.failed}"
    if summary.failed:
        # Never marked sent: read as lost after an outage, they are in the file still.
        # One the API refused for good (a 400) will be refused again: said apart.
        refused = f"; the API refused {summary.refused} for good" if summary.refused else ""
        line += f" (tried again next run{refused})"
    if summary.left:
        line += f", left {summary.left} for the next run"
    print(line)
    if summary.stopped:
        print(f"stopped: {summary.stopped}", file=sys.stderr)
    if summary.unmarked:
        print(
            f"{summary.unmarked} event(s) accepted by the API could not be marked in the file: "
            "the next run sends them again",
            file=sys.stderr,
        )
    if summary.first_error:
        print(f"first failure: {summary.first_error}", file=sys.stderr)
    if summary.interrupted:
        # The shell's code for the signal: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP.
        return 128 + (summary.signal_number or 2)
    return 1 if summary.failed or summary.left or summary.unmarked or summary.stopped else 0


# --------------------------------------------------------------------------- demo


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=DEFAULT_PATH,
        help=f"the events file it writes without an API key (default: {DEFAULT_PATH})",
    )


def _run_demo(args: argparse.Namespace) -> int:
    # The demo is the checkout's examples/demo.py (FastAPI is a test dependency, not ours).
    sys.path.insert(0, os.getcwd())
    try:
        from examples.demo import main as demo
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "examples":
            # In a checkout, but a package the demo needs is missing.
            return _fail(f"the demo needs {exc.name}: run `make demo`, which installs it")
        return _fail(
            "the demo lives in the repository's examples/ folder: run it from a checkout "
            "(make demo)"
        )
    demo(["--host", args.host, "--port", str(args.port), "--db", args.db])
    return 0


# --------------------------------------------------------------------------- standin


def _configure_standin(parser: argparse.ArgumentParser) -> None:
    from ._standin import add_arguments

    add_arguments(parser)
    parser.set_defaults(parser=parser)


def _run_standin(args: argparse.Namespace) -> int:
    from ._standin import serve

    return serve(args, args.parser)


# --------------------------------------------------------------------------- main

#: Subcommand name -> how to parse and run it, in the order ``--help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "report": Subcommand(
        "show the interaction rate from the local events file",
        _configure_report,
        _run_report,
    ),
    "send": Subcommand(
        "replay the local events file to the AgentSight API (idempotent)",
        _configure_send,
        _run_send,
    ),
    "demo": Subcommand(
        "start the demo shop with a chat widget (from a checkout)",
        _configure_demo,
        _run_demo,
    ),
    "standin": Subcommand(
        "run a local stand-in for the AgentSight API, with faults on demand",
        _configure_standin,
        _run_standin,
    ),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each subcommand's own by name."""
    from .__version__ import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for the AgentSight middleware: report and send the local "
        "events file, run the demo or a stand-in for the API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    by_name: dict[str, argparse.ArgumentParser] = {}
    for name, command in SUBCOMMANDS.items():
        sub = by_name[name] = subparsers.add_parser(
            name, help=command.help, description=command.help
        )
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser, by_name


def main(argv: list[str] | None = None) -> int:
    parser, subcommands = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Said by the subcommand's parser, with its own usage: argparse's parse_args()
        # has the top-level parser say it, with the usage of the command line as a whole.
        subcommands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = args.run(args)
    except BrokenPipeError:
        # `... report | head`: the reader left, not an error worth a traceback. Point
        # stdout at devnull so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
