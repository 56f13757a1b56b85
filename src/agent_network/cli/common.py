"""What every command of the CLI shares: consoles, connection settings, output, errors.

- Connection settings: ``--url`` / ``--token`` on every API command; when left out, the
  environment variables ``AGENT_NETWORK_URL`` / ``AGENT_NETWORK_TOKEN``, then a ``.env`` file in
  the current directory (the same two names), then ``http://127.0.0.1:8321`` for the URL.
  ``AGENT_NETWORK_KEY`` (the old name ``knowledge add`` read) still works for the token, after
  the others, as a deprecated fallback.
- Output: tables on a terminal (whole ids: id columns fold, never cut; when the output is not
  a terminal the console is wide enough for any line), JSON with ``--json``.
- Errors: a user mistake never prints a traceback. :func:`api_errors` turns an
  :class:`~agent_network.client.ApiError` into ``error: <code>: <message>`` on stderr and exit
  status 1 (:class:`~agent_network.client.TransportError`: ``error: cannot reach <url>: ...``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8321"
URL_ENV = "AGENT_NETWORK_URL"
TOKEN_ENV = "AGENT_NETWORK_TOKEN"
DEPRECATED_TOKEN_ENV = "AGENT_NETWORK_KEY"
NOT_A_TERMINAL_WIDTH = 10_000

P = ParamSpec("P")
T = TypeVar("T")


def typer_app(help_text: str, *, hidden: bool = False) -> typer.Typer:
    """A command group as the CLI makes them: help shown without arguments, no completion
    commands, and help texts printed as written (``rich_markup_mode=None``: a bracketed hint
    such as ``[env AGENT_NETWORK_URL]`` is not eaten as Rich markup)."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,
        hidden=hidden,
    )


def out() -> Console:
    """The console of standard output, made for the stream as it is now: on a terminal its
    width; otherwise (a pipe, a file, a test runner) wide enough that no line or table is cut."""
    stream = sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        width=None if terminal else NOT_A_TERMINAL_WIDTH,
        force_terminal=None,
        highlight=False,
        soft_wrap=not terminal,
    )


def err() -> Console:
    """The console of standard error (messages and errors), same width rules as :func:`out`."""
    stream = sys.stderr
    return Console(
        file=stream,
        width=None if stream.isatty() else NOT_A_TERMINAL_WIDTH,
        highlight=False,
    )


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr (as plain text, never markup) and exit ``code``."""
    err().print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr (plain text)."""
    err().print(f"warning: {message}", markup=False)


# ---------------------------------------------------------------------------------------------
# Connection settings


def dotenv_values_here() -> dict[str, str]:
    """The ``KEY=value`` pairs of ``./.env`` (empty when there is none). The process environment
    is not changed."""
    path = Path.cwd() / ".env"
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def setting(name: str) -> str | None:
    """``name`` from the environment, else from ``./.env``, else None (empty counts as unset)."""
    value = os.environ.get(name) or dotenv_values_here().get(name)
    return value or None


@dataclass(frozen=True)
class Connection:
    """Where and as whom an API command talks: the server ``url`` and the ``token``."""

    url: str
    token: str


def connection(url: str | None, token: str | None, *, need_token: bool = True) -> Connection:
    """Resolve ``--url`` / ``--token`` (options first, then env, then ``./.env``; for the token
    the deprecated ``AGENT_NETWORK_KEY`` last). Exits 2 with a message when a token is needed
    and none is given."""
    resolved_url = url or setting(URL_ENV) or DEFAULT_URL
    resolved_token = token or setting(TOKEN_ENV) or ""
    if not resolved_token and (legacy := setting(DEPRECATED_TOKEN_ENV)):
        warn(f"{DEPRECATED_TOKEN_ENV} is deprecated: name the credential {TOKEN_ENV}")
        resolved_token = legacy
    if need_token and not resolved_token:
        fail(f"give the credential with --token or {TOKEN_ENV} (environment or ./.env)", 2)
    return Connection(resolved_url.rstrip("/"), resolved_token)


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help=f"server URL [env {URL_ENV}, ./.env; default {DEFAULT_URL}]",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help=f"credential: org key, user or agent token, admin key [env {TOKEN_ENV}, ./.env]",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON (whole ids)")]


@contextmanager
def api(url: str | None, token: str | None) -> Iterator[Any]:
    """A blocking SDK :class:`~agent_network.client.Client` for the resolved connection, with
    :func:`api_errors` around its use."""
    from agent_network.client import Client

    conn = connection(url, token)
    with api_errors(conn.url), Client(conn.url, conn.token, timeout=120) as client:
        yield client


@contextmanager
def api_errors(url: str = "") -> Iterator[None]:
    """Turn the SDK's errors into one line on stderr and exit status 1: ``error: <code>:
    <message>`` for an :class:`ApiError`, ``error: cannot reach <url>: ...`` when the server
    does not answer, ``error: <message>`` for a bad argument the SDK refused (ValueError)."""
    from agent_network.client import ApiError, TransportError

    try:
        yield
    except ApiError as exc:
        fail(f"{exc.code}: {exc.message}")
    except TransportError as exc:
        fail(f"cannot reach the server at {url or 'the given URL'}: {exc}")
    except ValueError as exc:
        fail(str(exc), 2)


def handles_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate a command so that SDK errors end as one line and exit 1 (:func:`api_errors`)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with api_errors(str(kwargs.get("url") or setting(URL_ENV) or DEFAULT_URL)):
            return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------
# Output


def plain(value: Any) -> Any:
    """JSON-ready data of ``value`` (pydantic models dumped in JSON mode, lists mapped)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    """Print ``value`` as one JSON document on stdout."""
    typer.echo(json.dumps(plain(value), ensure_ascii=False, default=str))


def cell(value: Any) -> str:
    """Text of a table cell: ``-`` for None, JSON for containers, ``str`` otherwise."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    if hasattr(value, "isoformat"):
        return str(value.isoformat(timespec="seconds"))
    return str(value)


def table(rows: Iterable[Any], columns: Sequence[str], *, title: str | None = None) -> Table:
    """A Rich table of ``columns`` read from each row (a model or a dict); cells are plain text
    (never markup) and id columns fold instead of being cut."""
    from rich.text import Text

    grid = Table(title=title)
    for name in columns:
        is_id = name == "id" or name.endswith("_id")
        grid.add_column(name, overflow="fold", no_wrap=is_id)
    for row in rows:
        data = plain(row)
        grid.add_row(*(Text(cell(data.get(name))) for name in columns))
    return grid


def show(
    value: Any, columns: Sequence[str], *, json_output: bool, title: str | None = None
) -> None:
    """Print ``value`` (a model or a list of them) as JSON, or as a table of ``columns``."""
    if json_output:
        print_json(value)
        return
    rows = value if isinstance(value, list) else [value]
    out().print(table(rows, columns, title=title))


def report_done(result: dict[str, Any], text: str, *, json_output: bool) -> None:
    """Say that an action without a resource to show (delete, revoke, remove) is done: ``result``
    as one JSON object with ``--json``, else ``text`` (printed as is, never as Rich markup)."""
    if json_output:
        typer.echo(json.dumps(result))
    else:
        out().print(text, markup=False)


def show_record(value: Any, *, json_output: bool) -> None:
    """Print one record as JSON, or as ``field: value`` lines (every field, whole values)."""
    if json_output:
        print_json(value)
        return
    from rich.text import Text

    console = out()
    for key, item in plain(value).items():
        console.print(Text(f"{key}: {cell(item)}"))
