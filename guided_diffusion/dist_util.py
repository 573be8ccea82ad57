"""Distributed helpers: every piece of multi-process code in the project lives here.

Processes are started by ``mpirun -n N`` (or not at all). ``setup_dist`` reads the rank and
world size from MPI (mpi4py), picks one GPU per *local* rank (ranks that share a node), and
initialises ``torch.distributed`` with NCCL on GPUs or gloo on CPUs. Without ``mpirun`` (or
without mpi4py) everything works as a single process: rank 0 of a world of size 1.
"""

from __future__ import annotations

import gc
import io
import os
import socket
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

_DEVICE: torch.device | None = None


def _mpi_comm():
    """The MPI world communicator, or None when mpi4py/MPI is unavailable."""
    try:
        from mpi4py import MPI
    except Exception:  # pragma: no cover - depends on the installation
        return None
    return MPI.COMM_WORLD


def _mpi_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from MPI, or (0, 1, 0) for a single process."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMI_SIZE" not in os.environ:
        # Not started by mpirun: avoid initialising MPI at all (faster, and works without MPI).
        return 0, 1, 0
    comm = _mpi_comm()
    if comm is None:
        return 0, 1, 0
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    return comm.Get_rank(), comm.Get_size(), local_rank


def setup_dist(backend: str | None = None) -> None:
    """Initialise ``torch.distributed`` for this process (idempotent).

    The world comes from MPI when started by ``mpirun``. Rank 0 picks a free TCP port and
    broadcasts it over MPI. ``backend`` defaults to ``nccl`` when CUDA is available and
    ``gloo`` otherwise. The device is ``cuda:local_rank % num_gpus``.
    """
    global _DEVICE
    if dist.is_initialized():
        return
    rank, world, local_rank = _mpi_world()
    if torch.cuda.is_available():
        _DEVICE = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_DEVICE)
    else:
        _DEVICE = torch.device("cpu")
    if world == 1:
        return  # a single process needs no process group
    backend = backend or ("nccl" if _DEVICE.type == "cuda" else "gloo")
    comm = _mpi_comm()
    hostname = "localhost" if comm.Get_size() == 1 else socket.gethostbyname(socket.getfqdn())
    master_addr = comm.bcast(hostname, root=0)
    port = comm.bcast(_find_free_port() if rank == 0 else None, root=0)
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = str(local_rank)
    kwargs = {"device_id": _DEVICE} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)


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
    the original exception; the others raise the same type with the same message when it
    can be rebuilt from the message, else ``RankZeroError``.
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
    cls, message = described
    try:
        rebuilt = cls(message)
    except Exception:
        rebuilt = RankZeroError(message)
    raise rebuilt


def _describe(error: Exception | None):
    """(exception class, message) if the class is picklable by reference, else RankZeroError."""
    if error is None:
        return None
    cls = type(error)
    message = str(error.args[0]) if len(error.args) == 1 else str(error)
    if cls.__module__ == "builtins" or cls.__module__.startswith(
        ("guided_diffusion", "evaluations")
    ):
        return cls, message
    return RankZeroError, f"{cls.__name__}: {message}"


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
    first, and an MPI barrier after the teardown keeps rank 0, which hosts the TCP store,
    alive until every rank has let go of it. Without this a rank could abort at exit
    ("terminate called without an active exception") when rank 0 left first.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    comm = _mpi_comm()
    if comm is not None and comm.Get_size() > 1:
        comm.Barrier()
