"""Logging of ``agent-network serve`` (and the runner): structlog and the standard library
through one handler on stderr.

Plain, coloured-when-possible text on a terminal; one JSON object per line otherwise (a log
collector, a file, systemd). uvicorn's own loggers (``uvicorn.error``, ``uvicorn.access``: the
access log at ``info``) go through the same handler, so every line has one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", *, json_lines: bool | None = None) -> None:
    """Route structlog and standard logging to stderr at ``level`` (one of :data:`LEVELS`).

    ``json_lines`` None: JSON when stderr is not a terminal, readable text when it is.
    Raises ``ValueError`` for an unknown level.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    numeric = getattr(logging, level.upper())
    as_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_agent_network", False):
            root.removeHandler(old)
    handler._agent_network = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(numeric)
