"""Launchers: torchrun and mpirun give the same results, MPI is optional; gpu_check dry-run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import dist_util

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]  # a free port
MPIRUN = [str(BIN / "mpirun"), "-n", "2", sys.executable]
SAMPLE = ["--num_samples", "8", "--batch_size", "4", "--timestep_respacing", "4"]
LAUNCH_ENV = (*dist_util.TORCH_ENV, *dist_util.MPI_ENV, "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def env(tmp_path: Path | None = None, hide_mpi4py: bool = False) -> dict:
    """One thread per process; with ``hide_mpi4py``, ``import mpi4py`` fails in every
    Python process started with this environment (as in a venv without mpi4py)."""
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "OPENAI_LOGDIR"}
    e.update(OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}")
    e["PYTHONPATH"] = str(ROOT)
    if hide_mpi4py:
        site = tmp_path / "no_mpi4py"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text("import sys\nsys.modules['mpi4py'] = None\n")
        e["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    return e


def run(cmd, environ, timeout=180):
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=timeout,
    )


def sample(launch, log_dir, environ):
    """scripts/image_sample.py with the bundled model (no --model_path), tiny settings."""
    cmd = [*launch, ROOT / "scripts" / "image_sample.py", *SAMPLE, "--log_dir", log_dir]
    proc = run(cmd, environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (npz,) = Path(log_dir).glob("samples_8x*.npz")
    with np.load(npz) as z:
        return proc, {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- in process


def test_launcher_is_read_from_the_environment():
    assert dist_util.launcher({}) == "none"
    assert dist_util.launcher({"PMI_SIZE": "2", "PMI_RANK": "1"}) == "mpi"  # MPICH/hydra
    assert dist_util.launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"  # Open MPI
    assert dist_util.launcher({"PMIX_RANK": "0"}) == "mpi"  # srun --mpi=pmix
    # torchrun inside an srun/mpirun allocation: torch's variables win
    assert dist_util.launcher({"RANK": "0", "WORLD_SIZE": "2", "PMI_SIZE": "2"}) == "torchrun"


def test_torchrun_variables_are_checked():
    full = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="29500")
    assert dist_util._torch_world(full) == (3, 4, 1)
    assert dist_util._torch_world({"RANK": "0", "WORLD_SIZE": "1"}) == (0, 1, 0)
    bad = [
        ({k: v for k, v in full.items() if k != "LOCAL_RANK"}, "LOCAL_RANK=(unset)"),
        ({**full, "RANK": "4"}, "RANK=4 WORLD_SIZE=4"),
        ({**full, "WORLD_SIZE": "x"}, "WORLD_SIZE=x"),
        ({k: v for k, v in full.items() if k != "MASTER_ADDR"}, "MASTER_ADDR not set"),
    ]
    for environ, message in bad:
        with pytest.raises(dist_util.LaunchError, match=re.escape(message)):
            dist_util._torch_world(environ)


def test_mpi_without_mpi4py(monkeypatch):
    """A world of 1 needs no MPI; more processes without mpi4py: one line with the fix."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert dist_util._mpi_world({"PMI_SIZE": "1", "PMI_RANK": "0"}) == (0, 1, 0, None)
    with pytest.raises(dist_util.LaunchError) as e:
        dist_util._mpi_world({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message  # cli(): one line
    assert "pip install mpi4py mpich" in message and "torchrun --nproc_per_node 2" in message


def test_single_process_needs_no_launcher(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # and never touches MPI
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    for extra in ({}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, {"PMI_SIZE": "1"}):
        for k, v in extra.items():
            monkeypatch.setenv(k, v)
        dist_util.setup_dist()
        assert not torch.distributed.is_initialized()
        assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.get_local_rank()) == (
            0,
            1,
            0,
        )
        assert dist_util.dev().type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert dist_util.all_gather_object("x") == ["x"] and dist_util.broadcast_object(5) == 5
        dist_util.cleanup()
        for k in extra:
            monkeypatch.delenv(k)


def test_rank0_errors_are_rebuilt_faithfully_on_the_other_ranks():
    """What on_rank0 sends: an OSError keeps errno, strerror and filename (callers read
    them); a foreign class becomes RankZeroError naming it."""
    for error in (IsADirectoryError(21, "Is a directory", "/ckpt"), ValueError("bad flag")):
        cls, args = dist_util._describe(error)
        rebuilt = cls(*args)
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert getattr(rebuilt, "strerror", None) == getattr(error, "strerror", None)
        assert getattr(rebuilt, "filename", None) == getattr(error, "filename", None)
    cls, args = dist_util._describe(np.linalg.LinAlgError("singular"))
    assert cls is dist_util.RankZeroError and args == ("LinAlgError: singular",)


# ----------------------------------------------------------------------------- end to end


def test_torchrun_sampling_equals_mpirun_and_one_process(tmp_path):
    """The same arrays from 1 process, mpirun -n 2 and torchrun (without mpi4py) x 2."""
    _, one = sample([sys.executable], tmp_path / "one", env())
    _, mpi = sample(MPIRUN, tmp_path / "mpi", env())
    proc, tr = sample(TORCHRUN, tmp_path / "torchrun", env(tmp_path, hide_mpi4py=True))
    assert "2 process(es)" in proc.stdout + (tmp_path / "torchrun" / "log.txt").read_text()
    assert (tmp_path / "torchrun" / "log-rank001.txt").exists()  # rank 1 took part
    assert one.keys() == mpi.keys() == tr.keys() and one["arr_0"].shape[0] == 8
    for k in one:
        np.testing.assert_array_equal(mpi[k], one[k])
        np.testing.assert_array_equal(tr[k], one[k])


def test_mpirun_without_mpi4py_says_how_to_install_it(tmp_path):
    cmd = [*MPIRUN, ROOT / "scripts" / "image_sample.py", *SAMPLE]
    proc = run([*cmd, "--log_dir", tmp_path / "out"], env(tmp_path, hide_mpi4py=True))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and len(set(lines)) == 1, proc.stderr  # one line per rank
    assert lines[0].startswith("image_sample.py: error: started by mpirun with 2 processes")
    assert "pip install mpi4py mpich" in lines[0] and "torchrun" in lines[0]


def test_training_resumed_under_torchrun_equals_the_uninterrupted_run(tmp_path):
    """2 ranks under torchrun: stop at step 2 and resume to 4 == train to 4 in one go."""
    rng = np.random.default_rng(0)
    y = np.arange(16) % 2
    x = np.where(y[:, None, None, None] == 1, 200, 50) + rng.integers(-8, 9, (16, 8, 8, 3))
    data = tmp_path / "d.npz"
    np.savez(data, x.astype(np.uint8), y)
    flags = (
        "--image_size=8 --num_channels=32 --channel_mult=1,2 --num_res_blocks=1 "
        "--attention_resolutions=4 --num_head_channels=16 --diffusion_steps=20 "
        "--noise_schedule=cosine --learn_sigma=True --batch_size=2 --microbatch=1 --lr=1e-3 "
        "--ema_rate=0.9 --save_interval=2 --log_interval=1 --max_steps=4 --num_workers=0"
    ).split()
    cmd = [*TORCHRUN, ROOT / "scripts" / "image_train.py", *flags, f"--data_dir={data}"]
    environ = env(tmp_path, hide_mpi4py=True)
    full = run([*cmd, f"--log_dir={tmp_path / 'full'}"], environ)
    assert full.returncode == 0, full.stdout + full.stderr
    resume = f"--resume_checkpoint={tmp_path / 'full' / 'model000002.pt'}"
    resumed = run([*cmd, f"--log_dir={tmp_path / 'resumed'}", resume], environ)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = (tmp_path / "full" / "log.txt").read_text()  # logger.logkv's table
    samples = [int(n) for n in re.findall(r"\| samples\s+\| (\d+)", log)]
    assert samples[-1] == 4 * 2 * 2, log  # 4 steps of 2 ranks x batch 2: both ranks trained
    assert (tmp_path / "full" / "log-rank001.txt").exists()
    for name in ("model000004.pt", "ema_0.9_000004.pt", "opt000004.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert flat_a.keys() == flat_b.keys() and flat_a
        for k in flat_a:
            torch.testing.assert_close(flat_b[k], flat_a[k], rtol=0, atol=1e-6, msg=f"{name} {k}")


def _tensors(obj, prefix=""):
    """The tensors of a (nested) state dict, by dotted path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# ----------------------------------------------------------------------------- gpu_check


def test_gpu_check_dry_run_prints_the_summary_table():
    proc = run(["bash", ROOT / "benchmarks" / "gpu_check.sh", "--dry-run"], env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("== summary:")[1].splitlines()
    rows = {
        tuple(ln.split()[:3]): ln.split()
        for ln in table
        if ln.startswith(("sample", "train", "eval"))
    }
    paths = ("plain", "default", "fastest")
    expected = [("sample", c, p) for c in ("tiny-fp32", "tiny-fp16-cond") for p in paths]
    expected += [("sample", "tiny-fp32", "fastest-fp16"), ("train", "tiny32", "fp32")]
    expected += [("train", "tiny32", "fast"), ("eval", "inception-32px", "default")]
    assert sorted(rows) == sorted(expected), proc.stdout
    assert table[-1].strip() == f"{len(expected)} rows, 0 failed"
    for cols in rows.values():
        assert float(cols[6]) > 0, cols  # the rate
    # relative error vs strict fp32: float rounding for fp32 paths, fp16 rounding for fp16
    err = {(k[1], k[2]): float(v[8]) for k, v in rows.items() if k[0] == "sample"}
    for path in ("plain", "default", "fastest"):
        assert err["tiny-fp32", path] < 1e-5
        assert 1e-5 < err["tiny-fp16-cond", path] < 2e-2
