"""Key-value and text logging with the guided-diffusion (OpenAI baselines) API.

``configure(dir)`` chooses a log folder (``dir``, else ``$OPENAI_LOGDIR``, else a timestamped
folder in the temp dir). Rank 0 writes to stdout, ``log.txt`` and ``progress.csv``; other
ranks write ``log-rankNNN.txt`` only. ``logkv``/``logkv_mean`` collect values that
``dumpkvs`` averages over ranks and writes as one row.

The original's public names are kept: ``Logger`` (with ``Logger.CURRENT``/``DEFAULT``,
``set_level``, ``set_comm``, ``get_dir``), ``configure``, ``scoped_configure``, ``reset``,
``logkv(s)``, ``logkv_mean``, ``dumpkvs``, ``getkvs``, ``log``/``debug``/``info``/``warn``/
``error``, ``set_level``, ``set_comm``, ``get_dir``, ``profile_kv``, ``profile``,
``record_tabular``, ``dump_tabular``. Not kept: the ``tensorboard`` output format (it needs
TensorFlow). ``comm`` may be an mpi4py communicator (as in the original) or ``True`` for
the ``torch.distributed`` group of ``dist_util``.
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class KVWriter:
    def writekvs(self, kvs: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeqWriter:
    def writeseq(self, seq: List[str]) -> None:
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """A box of key | value rows for key-values, plain lines for text."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "a")
            self.own_file = True
        else:
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        rows = [(_truncate(k), _truncate(_fmt(v))) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        dashes = "-" * (kw + vw + 7)
        lines = [dashes] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [dashes]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq: List[str]) -> None:
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    def __init__(self, filename: str):
        self.file = open(filename, "a")

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in kvs.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(KVWriter):
    """A CSV whose header grows when new keys appear (earlier rows are rewritten)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.keys: List[str] = []
        if os.path.exists(filename) and os.path.getsize(filename) > 0:
            with open(filename, newline="") as f:
                header = next(csv.reader(f), [])
            self.keys = header

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        new = sorted(k for k in kvs if k not in self.keys)
        if new:
            rows = []
            if os.path.exists(self.filename):
                with open(self.filename, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.keys += new
            with open(self.filename, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.keys)
                w.writeheader()
                w.writerows(rows)
        with open(self.filename, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.keys).writerow({k: kvs.get(k, "") for k in self.keys})


def _fmt(v: Any) -> str:
    return f"{v:<8.3g}" if isinstance(v, float) else str(v)


def _truncate(s: str) -> str:
    return s[:27] + "..." if len(s) > 30 else s


def make_output_format(format: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    raise ValueError(f"unknown log format {format!r}")


class Logger:
    """Holds the current key-values and writes them to the output formats.

    ``Logger.CURRENT`` is the logger the module functions use; ``Logger.DEFAULT`` the one
    they fall back to before ``configure`` (stdout only, no folder).
    """

    DEFAULT: Optional[Logger] = None
    CURRENT: Optional[Logger] = None

    def __init__(self, dir: Optional[str], output_formats: List[KVWriter], comm: Any = None):
        self.name2val: Dict[str, float] = defaultdict(float)
        self.name2cnt: Dict[str, int] = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key: str, val: Any) -> None:
        oldval, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = oldval * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self) -> Dict[str, Any]:
        if self.comm is None:
            d = dict(self.name2val)
        else:
            d = _weighted_mean_over_ranks(self.comm, self.name2val, self.name2cnt)
        out = d.copy()
        for fmt in self.output_formats:
            fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args: Any, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq([str(a) for a in args])

    def set_level(self, level: int) -> None:
        """Log only messages at ``level`` or above (DEBUG, INFO, WARN, ERROR, DISABLED)."""
        self.level = level

    def set_comm(self, comm: Any) -> None:
        """Average ``dumpkvs`` over the ranks of ``comm`` (None: this process only)."""
        self.comm = comm

    def get_dir(self) -> Optional[str]:
        """The log folder (None for the stdout-only default logger)."""
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


def _weighted_mean_over_ranks(comm: Any, name2val, name2cnt) -> Dict[str, Any]:
    """Average numeric key-values over ranks, weighted by their counts (every rank calls).

    ``comm`` is an mpi4py communicator (its ``allgather``) or any other true value for
    ``dist_util``'s process group.
    """
    local = (dict(name2val), dict(name2cnt))
    if hasattr(comm, "allgather"):
        gathered = comm.allgather(local)
    else:
        from . import dist_util

        gathered = dist_util.all_gather_object(local)
    sums: Dict[str, float] = defaultdict(float)
    counts: Dict[str, float] = defaultdict(float)
    other: Dict[str, Any] = {}
    for vals, cnts in gathered:
        for k, v in vals.items():
            try:
                w = cnts.get(k, 1) or 1
                sums[k] += float(v) * w
                counts[k] += w
            except (TypeError, ValueError):
                other[k] = v
    out = {k: sums[k] / counts[k] for k in sums}
    out.update(other)
    return out


def mpi_weighted_mean(comm: Any, local_name2valcount: Dict[str, Any]) -> Dict[str, Any]:
    """guided-diffusion's helper: ``{name: (value, count)}`` of this rank averaged over all
    ranks of ``comm``, weighted by the counts (every rank calls). The original returns the
    result on rank 0 only and ``{}`` elsewhere; so does this."""
    name2val = {k: v for k, (v, _) in local_name2valcount.items()}
    name2cnt = {k: c for k, (_, c) in local_name2valcount.items()}
    out = _weighted_mean_over_ranks(comm, name2val, name2cnt)
    rank = comm.Get_rank() if hasattr(comm, "Get_rank") else get_rank_without_mpi_import()
    return out if rank == 0 else {}


def get_rank_without_mpi_import() -> int:
    """This process's rank from the launcher's environment (MPI, SLURM or torchrun), 0 when
    none is set; imports no MPI (guided-diffusion's helper)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _configure_default_logger() -> None:
    """Configure the default logger (guided-diffusion's helper): ``configure()`` then make
    it the one ``reset`` returns to."""
    configure()
    Logger.DEFAULT = Logger.CURRENT


def get_current() -> Logger:
    """The logger of the module functions (a stdout-only one before ``configure``)."""
    if Logger.CURRENT is None:
        if Logger.DEFAULT is None:
            Logger.DEFAULT = Logger(None, [HumanOutputFormat(sys.stdout)])
        Logger.CURRENT = Logger.DEFAULT
    return Logger.CURRENT


def configure(
    dir: Optional[str] = None,
    format_strs: Optional[List[str]] = None,
    comm: Any = None,
    log_suffix: str = "",
) -> None:
    """Direct logging to ``dir`` (else ``$OPENAI_LOGDIR``, else a timestamped temp folder)."""
    from . import dist_util

    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
        dir = dist_util.broadcast_object(dir)
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)
    rank = dist_util.get_rank()
    if rank > 0:
        log_suffix = log_suffix + f"-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    formats = [make_output_format(f, dir, log_suffix) for f in filter(None, format_strs)]
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    if comm is None and dist_util.get_world_size() > 1:
        comm = True
    Logger.CURRENT = Logger(dir=dir, output_formats=formats, comm=comm)
    if formats:
        log(f"Logging to {dir}")


def reset() -> None:
    """Close the configured logger; the module functions fall back to stdout only."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = None


@contextmanager
def scoped_configure(
    dir: Optional[str] = None, format_strs: Optional[List[str]] = None, comm: Any = None
) -> Iterator[None]:
    """``configure`` for the duration of a ``with`` block, then restore the previous logger."""
    previous = Logger.CURRENT
    Logger.CURRENT = None  # configure must not close the logger it will restore
    try:
        configure(dir=dir, format_strs=format_strs, comm=comm)
        yield
    finally:
        if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
            Logger.CURRENT.close()
        Logger.CURRENT = previous


def logkv(key: str, val: Any) -> None:
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> Dict[str, Any]:
    return get_current().dumpkvs()


def getkvs() -> Dict[str, Any]:
    return get_current().name2val


def log(*args: Any, level: int = INFO) -> None:
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    log(*args, level=WARN)


def error(*args: Any) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    """Log only messages at ``level`` or above on the current logger."""
    get_current().set_level(level)


def set_comm(comm: Any) -> None:
    """Average ``dumpkvs`` of the current logger over the ranks of ``comm``."""
    get_current().set_comm(comm)


def get_dir() -> Optional[str]:
    """The current log folder (None before ``configure``)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename: str):
    """Accumulate the wall time of a block under ``wait_<scopename>``."""
    logkey = "wait_" + scopename
    tstart = time.time()
    try:
        yield
    finally:
        get_current().name2val[logkey] += time.time() - tstart


def profile(n: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: accumulate the wall time of every call under ``wait_<n>`` (``profile_kv``).

    Usage: ``@profile("my_func")`` above ``def my_func(): ...``.
    """

    def decorator_with_name(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def func_wrapper(*args: Any, **kwargs: Any) -> Any:
            with profile_kv(n):
                return func(*args, **kwargs)

        return func_wrapper

    return decorator_with_name
