"""What every ``covpool`` command writes: atomic files, CSV files, tables, figures and its console lines.

The one home of these rules, below the trainer (:mod:`covpool.train`), the benchmark (:mod:`covpool.bench`)
and the demo (:mod:`covpool.demo`), so that each writes its outputs the same way without importing another.
Importing it loads the standard library only: matplotlib loads when a figure is made, tqdm when a console
line is written.

Atomic writes: the bytes go to a temporary file ``.<name>.<random>.tmp`` in the destination's folder (same
file system, so the rename is atomic), are flushed and fsynced, and the file is moved into place with
:func:`os.replace`. A crash mid-write leaves the previous file whole and no partial file under the real name;
:func:`remove_leftover_temporaries` clears what a killed process left behind (the two spell the temporary
name in one place, so they cannot drift apart). A new file
gets the mode any program's new file gets (0666 less the umask, so colleagues can read a run on a shared file
system where the umask allows it); a replaced file keeps its mode.

Names that moved: :func:`moved_names` (the library's, re-exported for the application) gives a module the
``__getattr__`` that keeps an old import path working for one release, with a :class:`FutureWarning` naming the
new one.

Benchmark pages: :func:`write_markdown_page` writes a title, a line saying when, where and by which command
the figures were measured (:func:`covpool.bench.machine_stamp`, with :func:`cpu_description`), tables and
links to the plots as one Markdown page.
"""
from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import platform
import secrets
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ._deprecation import moved_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["atomic_write", "remove_leftover_temporaries", "os_error_in", "first_line", "write_csv", "format_value",
           "format_table", "new_figure", "save_figure", "console_logging", "cpu_description", "write_markdown_page",
           "moved_names"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object],
                 advice: str = "Free space there (or choose another folder) and try again") -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    On any error the temporary file is removed and the old ``path``, if any, is untouched; the folder is
    created when missing. A new file's mode is 0666 less the umask (as ``open(path, "w")`` gives); a file
    that is replaced keeps its mode.

    Raises:
        OSError: the write failed (full disk, quota, I/O error); the message names ``path``, the cause
            (which torch.save otherwise reports as a bare "unexpected pos" RuntimeError), whether the old
            file survived, and ``advice``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_in(err)
        if cause is None:
            raise
        kept = "the previous file is untouched" if path.exists() else "nothing was written"
        message = f"could not write {path}: {cause.strerror or cause}; {kept}. {advice}"
        raise (OSError(cause.errno, message) if cause.errno is not None else OSError(message)) from err
    return path


# The temporary file of `path` is `.<name>.<tag>.tmp` beside it: `tag` random while writing, `*` to find leftovers.
_TEMPORARY = ".{name}.{tag}.tmp"
# What covpool <= 0.1.0 left: a fixed `.<name>.tmp`, and `.<name>.<random><suffix>` for figures.
_OLD_TEMPORARIES = (".{name}.tmp", ".{name}.*{suffix}")


def remove_leftover_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` of ``path`` left in its folder (and those
    covpool 0.1.0 left), nothing else; returns what was removed. Call it only while no other process writes
    ``path`` (e.g. while holding the lock of a run folder), or a live writer's file is taken.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in (".last.pt.3f2a9c1e.tmp", ".last.pt.tmp", "last.pt", ".notes.tmp"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in remove_leftover_temporaries(folder / "last.pt")]
    ['.last.pt.3f2a9c1e.tmp', '.last.pt.tmp']
    >>> sorted(p.name for p in folder.iterdir())
    ['.notes.tmp', 'last.pt']
    """
    path = Path(path)
    name = glob.escape(path.name)
    patterns = [_TEMPORARY.format(name=name, tag="*")]
    patterns += [p.format(name=name, suffix=glob.escape(path.suffix)) for p in _OLD_TEMPORARIES]
    removed = []
    for pattern in patterns:
        for tmp in sorted(path.parent.glob(pattern)):
            if tmp.is_file() and tmp not in removed:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path``, opened for writing.

    Not :func:`tempfile.mkstemp`: it creates files with mode 0600 whatever the umask, which left checkpoints
    and plots unreadable to the colleagues who can read the run's ``config.yaml``. Here the kernel applies the
    umask (and a folder's default ACL) to 0666, as for any new file; a file being replaced lends its mode."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / _TEMPORARY.format(name=path.name, tag=secrets.token_hex(4))
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            try:
                os.chmod(tmp, mode)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file beside {path}: 100 random names were taken")


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save reports ENOSPC as a RuntimeError raised while cleaning up)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def first_line(err: BaseException, limit: int = 200) -> str:
    """What a one-line message quotes of another error: the first line of its message, cut to ``limit``
    characters (its type's name when the message is empty).

    >>> first_line(RuntimeError("Timed out waiting 2000ms\\n  at frame 1"))
    'Timed out waiting 2000ms'
    """
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, fields: Sequence[str] | None = None) -> Path:
    """``rows`` as a CSV file with the columns ``fields`` (default: the first row's keys; other keys are
    left out), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields if fields is not None else rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode("utf-8")))


def format_value(value: Any) -> str:
    """A table cell: floats to 3 significant digits (scientific from 10⁴), ``–`` for a missing value."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, headers: Mapping[str, str] | None = None,
                 formats: Mapping[str, str] | None = None, markdown: bool = False) -> str:
    """``rows`` as a table of ``columns`` (keys of the rows): aligned text (right-justified under a dashed
    rule, what a run prints at its end) or, with ``markdown``, a Markdown table (what ``covpool bench`` prints
    and the benchmark pages show). ``headers`` renames columns; a cell is ``formats[key].format(value)`` where a
    format is given, else :func:`format_value`; a missing value is ``–``.

    >>> print(format_table([{"d": 8, "ms": 1.25}], ["d", "ms"], headers={"ms": "time ms"}))
    d  time ms
    -  -------
    8     1.25
    >>> print(format_table([{"d": 8, "ms": 1.25}], ["d", "ms"], markdown=True))
    | d | ms |
    |---|---|
    | 8 | 1.25 |
    """
    headers, formats = headers or {}, formats or {}

    def cell(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        return formats[key].format(value) if key in formats and value is not None else format_value(value)

    head = [headers.get(key, key) for key in columns]
    body = [[cell(row, key) for key in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(text) for text in column) for column in zip(head, *body)]
    lines = ["  ".join(text.rjust(width) for text, width in zip(cells, widths)) for cells in (head, *body)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` on the Agg canvas, without pyplot: no GUI, no global backend switch
    (``matplotlib.use``), nothing kept in pyplot's registry after it is saved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 90) -> Path:
    """``fig`` (a matplotlib ``Figure``, e.g. :func:`new_figure`'s) as a PNG file at ``path`` (whatever its suffix),
    ``dpi`` pixels per inch, written atomically; returns the path."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def cpu_description() -> str:
    """The processor's name as the system reports it (``/proc/cpuinfo`` on Linux) and its logical CPUs,
    e.g. ``"Intel(R) Xeon(R) Processor (2 logical CPUs)"``: what a benchmark page says it was measured on."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def write_markdown_page(path: str | Path, title: str, stamp: str, sections: Sequence[str],
                        figures: Sequence[str | Path] = ()) -> Path:
    """A Markdown page (written atomically): ``# title``, the ``stamp`` line, the ``sections`` (Markdown
    text: tables with a line above each), then the ``figures`` as images linked by their path relative to
    the page, so that the page and its plots can move together."""
    path = Path(path)
    parts = [f"# {title}", stamp, *sections]
    parts += [f"![{Path(fig).name}]({Path(os.path.relpath(fig, path.parent)).as_posix()})" for fig in figures]
    text = "\n\n".join(parts) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class _ConsoleHandler(logging.Handler):
    """Writes a record's message through ``tqdm.write`` to the current ``sys.stdout``, so progress bars
    are redrawn below it rather than broken."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # as logging.StreamHandler: a failing console never stops a run
            self.handleError(record)


def _shown_on_a_console(logger: logging.Logger) -> bool:
    """Whether a handler on ``logger``'s way to the root already writes to the process's stdout or
    stderr (the user configured logging, e.g. ``logging.basicConfig()``)."""
    streams = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    node: logging.Logger | None = logger
    while node is not None:
        if any(id(getattr(h, "stream", None)) in streams for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


@contextmanager
def console_logging(name: str = "covpool") -> Iterator[None]:
    """Show the INFO lines of logger ``name`` (and its children) on stdout while the block runs, as the
    commands always have, unless the program decided where they go.

    covpool logs through :mod:`logging` (``logging.getLogger("covpool.train....")``), as timm does. Its
    lines go to the console when neither the ``covpool`` logger has a handler or a level of its own nor a
    handler on its way to the root writes to stdout or stderr; otherwise they follow the program's
    configuration: ``logging.getLogger("covpool").setLevel(logging.WARNING)`` silences them; a handler of
    your own with level INFO on that logger, or ``logging.basicConfig(level=logging.INFO)``, routes them.
    """
    logger = logging.getLogger(name)
    if logger.handlers or logger.level != logging.NOTSET or _shown_on_a_console(logger):
        yield
        return
    handler = _ConsoleHandler(logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
