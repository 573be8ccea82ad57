"""Distributed helpers: every piece of multi-process code in the project lives here.

A script can be started three ways; ``setup_dist`` tells them apart by the environment the
launcher leaves (``launcher()``):

- ``torchrun --nproc_per_node N`` (also multi-node, or any launcher that sets torch's
  ``env://`` variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): rank, world size and local rank come from those variables;
- ``mpirun -n N`` (``OMPI_COMM_WORLD_SIZE``: Open MPI; ``PMI_SIZE``: MPICH/hydra, Intel MPI,
  ``srun --mpi=pmi2``; ``PMIX_RANK``: PMIx launchers): they come from MPI through mpi4py,
  which is imported only then (an optional dependency: ``pip install -e ".[mpi]"``), and
  rank 0 broadcasts the address of the process group over MPI;
- no launcher: rank 0 of a world of size 1, no process group, no MPI.

Each process takes the GPU of its *local* rank (its index among the processes on its
node, modulo the GPUs there) and joins ``torch.distributed`` with NCCL on GPUs or gloo on
CPUs. A world of size 1 (``mpirun -n 1``, ``torchrun --nproc_per_node 1``) needs neither a
process group nor mpi4py.
"""

from __future__ import annotations

import gc
import io
import os
import socket
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

# Variables that mark a process started by an MPI launcher (any one of them).
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# torch's env:// rendezvous variables, as torchrun sets them.
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_DEVICE: torch.device | None = None
_LOCAL_RANK = 0
_MPI_COMM: Any = None  # the MPI world communicator, on the MPI path of a multi-process job


class LaunchError(ValueError):
    """The launcher's environment cannot start this job (scripts print it as one line).

    Raised for incomplete or inconsistent torchrun variables, and for a job started by
    ``mpirun`` with more than one process when mpi4py cannot be imported.
    """


def launcher(environ: Mapping[str, str] | None = None) -> str:
    """How this process was started: ``"torchrun"``, ``"mpi"`` or ``"none"``.

    ``"torchrun"`` when ``RANK`` or ``WORLD_SIZE`` is set (torchrun, or any launcher using
    torch's ``env://`` variables; they win over MPI variables inherited from an outer
    ``srun``/``mpirun``), ``"mpi"`` when one of ``MPI_ENV`` is set, else ``"none"``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torchrun"
    if any(k in env for k in MPI_ENV):
        return "mpi"
    return "none"


def _torch_world(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torch's env:// variables, checked."""
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0 if world == 1 else ""))
    except (KeyError, ValueError):
        got = " ".join(f"{k}={env.get(k, '(unset)')}" for k in TORCH_ENV)
        raise LaunchError(
            f"incomplete torchrun environment ({got}): RANK, WORLD_SIZE and LOCAL_RANK must "
            "be integers; launch with torchrun --nproc_per_node N"
        ) from None
    if not 0 <= rank < world or local_rank < 0:
        raise LaunchError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(k)]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)} not set for a world of {world} processes: launch with "
            "torchrun (--master_addr/--master_port for multi-node jobs)"
        )
    return rank, world, local_rank


def _mpi_world(env: Mapping[str, str]) -> tuple[int, int, int, Any]:
    """(rank, world_size, local_rank, communicator) of a job started by an MPI launcher.

    A world of size 1 (known from ``OMPI_COMM_WORLD_SIZE``/``PMI_SIZE``) needs no MPI and
    returns no communicator. Otherwise mpi4py must import; if it cannot, ``LaunchError``
    says how to install MPI support or to launch with torchrun instead.
    """
    size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
    if size == "1":
        return 0, 1, 0, None
    try:
        from mpi4py import MPI
    except Exception as e:  # ImportError, or mpi4py built against a missing MPI library
        n = size or "N"
        raise LaunchError(
            f"started by mpirun with {n} processes, but mpi4py cannot be imported ({e}): "
            f"install MPI support with 'pip install mpi4py mpich' (or pip install -e "
            f"'.[mpi]'), or launch with 'torchrun --nproc_per_node {n}' instead"
        ) from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    return comm.Get_rank(), comm.Get_size(), local_rank, comm


def setup_dist(backend: str | None = None) -> None:
    """Initialise ``torch.distributed`` for this process (idempotent).

    The world comes from the launcher (see the module docstring). Under torchrun the
    process group uses its ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``); under
    MPI rank 0 picks a free TCP port and broadcasts its address and port over MPI.
    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. The
    device is ``cuda:local_rank % num_gpus``. A world of size 1 gets no process group.
    Raises ``LaunchError`` when the launcher's environment cannot start the job.
    """
    global _DEVICE, _LOCAL_RANK, _MPI_COMM
    if dist.is_initialized():
        return
    how, comm = launcher(), None
    if how == "torchrun":
        rank, world, local_rank = _torch_world(os.environ)
    elif how == "mpi":
        rank, world, local_rank, comm = _mpi_world(os.environ)
    else:
        rank, world, local_rank = 0, 1, 0
    _LOCAL_RANK = local_rank
    if torch.cuda.is_available():
        _DEVICE = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_DEVICE)
    else:
        _DEVICE = torch.device("cpu")
    if world == 1:
        return  # a single process needs no process group
    backend = backend or ("nccl" if _DEVICE.type == "cuda" else "gloo")
    kwargs = {"device_id": _DEVICE} if backend == "nccl" else {}
    if comm is None:
        init_method = "env://"
    else:
        host = comm.bcast(socket.gethostbyname(socket.getfqdn()) if rank == 0 else None, root=0)
        port = comm.bcast(_find_free_port() if rank == 0 else None, root=0)
        init_method = f"tcp://{host}:{port}"
        _MPI_COMM = comm
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world, **kwargs
    )


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]


def dev() -> torch.device:
    """The device of this process (set by ``setup_dist``; CUDA if present, else CPU)."""
    if _DEVICE is not None:
        return _DEVICE
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def get_rank() -> int:
    """Rank of this process; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank of this process among those on its node (it picks ``cuda:local_rank % num_gpus``).

    Set by ``setup_dist`` from ``LOCAL_RANK`` (torchrun) or MPI's shared-memory split; 0
    before ``setup_dist`` and in a single process.
    """
    return _LOCAL_RANK


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (every rank must call this)."""
    if not dist.is_initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order (every rank calls this)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(indices: Any, rows: dict) -> dict:
    """Per-sample rows ``{name: array [n_local, ...]}`` of every process, concatenated and
    sorted by the global sample ``indices`` (every rank calls this; all get the result)."""
    parts = all_gather_object((np.asarray(indices), rows))
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx, kind="stable")
    return {k: np.concatenate([p[1][k] for p in parts], axis=0)[order] for k in rows}


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns a new tensor)."""
    if not dist.is_initialized():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y)
    return y / get_world_size()


class RankZeroError(RuntimeError):
    """Raised on the other ranks when the work of ``on_rank0`` failed on rank 0."""


def on_rank0(
    fn: Callable[..., Any], *args: Any, broadcast_result: bool = True, **kwargs: Any
) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error.

    Every rank must call this. Without it, an exception on rank 0 alone (a missing file,
    a full disk) leaves the other ranks waiting in the next collective. Rank 0 re-raises
    the original exception; the others raise the same type with the same message (an
    ``OSError`` with the same ``errno``, ``strerror`` and ``filename``) when it can be
    rebuilt, else ``RankZeroError``.
    """
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not dist.is_initialized():
                raise
            error = e
    if not dist.is_initialized():
        return result
    shared = (result if broadcast_result else None, _describe(error))
    result, described = broadcast_object(shared if get_rank() == 0 else None)
    if described is None:
        return result
    if error is not None:
        raise error
    cls, ctor_args = described
    try:
        rebuilt = cls(*ctor_args)
    except Exception:
        rebuilt = RankZeroError(" ".join(map(str, ctor_args)))
    raise rebuilt


def _describe(error: Exception | None):
    """(exception class, constructor arguments) that rebuild ``error`` on another rank.

    The class travels by reference when it is a builtin or one of the project's, else
    the error becomes a ``RankZeroError`` naming it. An ``OSError`` keeps its ``errno``,
    ``strerror`` and ``filename``; any other error keeps its message.
    """
    if error is None:
        return None
    cls = type(error)
    message = str(error.args[0]) if len(error.args) == 1 else str(error)
    if not (
        cls.__module__ == "builtins"
        or cls.__module__.startswith(("guided_diffusion", "evaluations"))
    ):
        return RankZeroError, (f"{cls.__name__}: {message}",)
    if isinstance(error, OSError) and error.errno is not None:
        return cls, (error.errno, error.strerror, error.filename)
    return cls, (message,)


def load_state_dict(path: str, **kwargs: Any) -> dict:
    """Read a checkpoint file on rank 0, broadcast its bytes, load it safely everywhere.

    Every rank must call this. Files are read with ``blobfile`` (local paths, gs://, az://)
    and deserialised with ``torch.load(weights_only=True)``: plain state dicts of tensors
    load; pickled code is refused. A read error on rank 0 (missing file, a directory, no
    permission) is raised on every rank.
    """
    payload = on_rank0(_read_bytes, path)
    kwargs.setdefault("map_location", "cpu")
    kwargs["weights_only"] = True
    return torch.load(io.BytesIO(payload), **kwargs)


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        with open(path, "rb") as f:
            return f.read()
    import blobfile as bf

    if not bf.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with bf.BlobFile(path, "rb") as f:
        return f.read()


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of these tensors to every rank (every rank calls this)."""
    if not dist.is_initialized():
        return
    for p in params:
        with torch.no_grad():
            dist.broadcast(p, 0)


def cleanup() -> None:
    """Tear down the process group (call at the end of a script).

    Every rank leaves together: objects holding the group (a DDP reducer) are collected
    first; under MPI, an MPI barrier after the teardown keeps rank 0, which hosts the TCP
    store, alive until every rank has let go of it. Without this a rank could abort at exit
    ("terminate called without an active exception") when rank 0 left first. (Under
    torchrun the store lives in torchrun's agent, not in rank 0.)
    """
    global _MPI_COMM
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    if _MPI_COMM is not None:
        _MPI_COMM.Barrier()
        _MPI_COMM = None
