"""What every entry point shares: one-line errors for people, rank-zero logging, a quiet console.

Wrap each ``@hydra.main`` function with ``one_line_errors`` (below ``@hydra.main``)::

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
    @one_line_errors
    def main(cfg: DictConfig) -> ...:
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, TypeVar

from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.progress import track

from cellseg.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
PACKAGE = str(Path(__file__).resolve().parent)
log = logging.getLogger(__name__)


def raised_by_cellseg(err: BaseException) -> bool:
    """Whether cellseg's own code raised ``err`` (a message written for people), rather than a
    library deep down, whose message needs its traceback to make sense."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(PACKAGE)


def own_cause(err: BaseException) -> BaseException:
    """The error itself, or for Hydra's ``InstantiationException`` (a cellseg class refusing its
    config in its constructor, e.g. the datamodule) the error that the constructor raised."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return err.__cause__
    return err


def message(err: BaseException) -> str:
    """The error's text on one line (a KeyError's without the quotes that ``str`` adds)."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required: pass {err.full_key}=... on the command line"
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def in_multirun() -> bool:
    """Whether this job is one of a Hydra sweep (whose sweeper handles a failing job itself)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


OWN_MESSAGES = (FileNotFoundError, FileExistsError, FloatingPointError)  # cellseg raises these
# with a message for people too (missing data, a non-finite loss)


def for_people(err: BaseException) -> bool:
    """Whether ``err`` is a message for a person (:class:`~cellseg.errors.UserError`, a missing
    value, or one of ``OWN_MESSAGES`` raised by cellseg's code) rather than a bug, whose
    traceback matters (a KeyError, IndexError, TypeError ... anywhere, a library's error)."""
    if isinstance(err, (UserError, MissingMandatoryValue)):
        return True
    return isinstance(err, OWN_MESSAGES) and raised_by_cellseg(err)


def one_line_errors(main: F) -> F:
    """Print errors for people as one line and exit with status 1; keep every other error's
    traceback, with a line that asks to report it.

    A :class:`~cellseg.errors.UserError` names the file or option, what was found and the fix;
    its traceback adds only noise (``HYDRA_FULL_ERROR=1`` shows it). In a multirun the error is
    logged and re-raised, so the sweeper marks the job failed.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            cause = own_cause(err)
            if not for_people(cause):
                log.error("cellseg stopped on an unexpected %s (a bug: please report it with "
                          "the traceback below)", type(cause).__name__)
                raise
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s (HYDRA_FULL_ERROR=1 shows the traceback)", message(cause))
            if in_multirun():
                raise
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def needs_quotes(value: str) -> bool:
    """Whether Hydra's override grammar would refuse ``value`` unquoted: a space or a letter
    outside ASCII (``/Users/me/My Images``, ``Zellkerne_Übersicht``), in a value that is not
    already quoted, a list, a dict or an interpolation."""
    if not value or value[0] in "'\"[{" or "${" in value:
        return False
    return any(c.isspace() or not c.isascii() for c in value)


def quote(value: str) -> str:
    """``value`` as one quoted Hydra string (its quote character escaped)."""
    q = "'" if "'" not in value or '"' in value else '"'
    return q + value.replace(q, "\\" + q) + q


def hydra_args(args: list[str], renames: dict[str, str] | None = None) -> list[str]:
    """Command-line overrides made safe for Hydra: values with spaces or non-ASCII letters
    quoted (what a shell passes for ``input="My Images"``), and ``renames``' keys renamed
    (``model=`` of predict is ``model_name`` in its config: ``model`` is training's group)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-"):
            key = (renames or {}).get(key, key)
            arg = f"{key}={quote(value) if needs_quotes(value) else value}"
        out.append(arg)
    return out


def missing_group(args: list[str], groups: dict[str, str]) -> str | None:
    """Why ``args`` set an option of a config group that none of them chooses (``data.root=DIR``
    without ``data=...``, where the config has no data by default), or None. Hydra's own error
    ("Could not override 'data.root' ... use +data.root") points to the wrong fix."""
    for group, example in groups.items():
        chosen = any(a.lstrip("+~").startswith(f"{group}=") for a in args)
        options = [a for a in args if a.lstrip("+~").startswith(f"{group}.")]
        if options and not chosen:
            return (f"{options[0]} sets an option of no {group}: choose the {group} first, "
                    f"e.g. {example}")
    return None


def run(main: Callable[[], Any], renames: dict[str, str] | None = None,
        groups: dict[str, str] | None = None) -> Any:
    """Start a ``@hydra.main`` entry point with :func:`hydra_args` applied to ``sys.argv``;
    ``groups``: config groups that are empty by default, with an example of choosing one, for
    :func:`missing_group`'s one-line refusal."""
    reason = missing_group(sys.argv[1:], groups or {})
    if reason:
        print(f"ERROR: {reason}", file=sys.stderr)
        sys.exit(1)
    sys.argv[1:] = hydra_args(sys.argv[1:], renames)
    return main()


class RankZeroFilter(logging.Filter):
    """Pass records of the process of global rank 0 only (one copy of each line under DDP)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return global_rank() == 0


def global_rank() -> int:
    """This process's DDP rank as Lightning sets it on ``rank_zero_only`` (0 where Lightning is
    not imported: predict runs without it)."""
    return getattr(rank_zero_only, "rank", 0)


def rank_zero_logger(name: str) -> logging.Logger:
    """The module's logger, silent on every DDP process but the first."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RankZeroFilter) for f in logger.filters):
        logger.addFilter(RankZeroFilter())
    return logger


class ConsoleFormatter(logging.Formatter):
    """``[12:34:56] message`` on the console; warnings and errors say so."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        if record.levelno >= logging.WARNING:
            record.message = f"{record.levelname}: {record.message}"
        return super().formatMessage(record)


def quiet_console() -> None:
    """Leave the console to cellseg's own lines: Lightning's trainer notices (device list, tips,
    batch limits) go below its warning level, and one deprecation of Lightning's own code
    that a newer torch reports on every run is filtered. (``lightning.fabric`` keeps its
    level: it says when DDP processes join.)"""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def progress(items: Iterable, description: str, total: int | None = None,
             at_least: int = 1, every_s: float = 10.0) -> Iterator:
    """Iterate ``items`` with progress for people: a transient rich bar on a terminal, else
    (a log file, ``nohup``, SLURM) a log line at a tenth of the way at most every ``every_s``
    seconds, and at the end, with the rate; nothing below ``at_least`` items."""
    total = total if total is not None else len(items) if isinstance(items, Sized) else None
    if total is not None and total < at_least:
        yield from items
        return
    if Console().is_terminal:
        yield from track(items, description=description, total=total, transient=True)
        return
    step = max(1, (total or 10) // 10)
    start = last = time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if (done % step == 0 and now - last >= every_s) or done == total:
            rate = done / max(now - start, 1e-9)
            log.info("%s: %d%s (%.2f/s)", description, done, f" of {total}" if total else "", rate)
            last = now
