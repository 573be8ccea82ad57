"""Tests of the training loop, mixed precision, checkpoints and resumption (tiny CPU models)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from guided_diffusion import logger, train_util
from guided_diffusion.cli import UserError
from guided_diffusion.flags import (
    DIFFUSION_FLAGS,
    GROUP_DEFAULTS,
    MODEL_FLAGS,
    TRAIN_FLAGS,
    flag_defaults,
)
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import (
    DeviceMeans,
    TrainLoop,
    atomic_save,
    find_resume_checkpoint,
    log_loss_dict,
    parse_ema_rates,
    parse_resume_step_from_filename,
    prepare_run,
    save_flags,
    step_seed,
)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A tiny UNet: 8x8 images, 2 levels, attention at 4x4, learned sigma, 20 cosine steps.
TINY = dict(
    image_size=8,
    num_channels=32,
    channel_mult="1,2",
    num_res_blocks=1,
    attention_resolutions="4",
    num_head_channels=16,
    diffusion_steps=20,
    noise_schedule="cosine",
    learn_sigma=True,
)


def tiny_flags(**overrides) -> dict:
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    flags.update(overrides)
    return flags


def cli_flags(flags: dict) -> list:
    return [f"--{k}={v}" for k, v in flags.items()]


def write_npz(path: Path, n: int = 16, size: int = 8, labels: bool = True) -> Path:
    """Two classes of flat images (dark and bright) with a little pixel noise."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = np.where(y[:, None, None, None] == 1, 200, 50) + rng.integers(-8, 9, (n, size, size, 3))
    arrays = [x.astype(np.uint8)] + ([y] if labels else [])
    np.savez(path, *arrays)
    return path


def script_command(name: str, *args: str, ranks: int = 0):
    """(command, environment) of scripts/NAME with one thread per process (2 shared cores:
    no OpenMP spinning), under ``mpirun -n ranks`` when ``ranks``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_LOGDIR", None)
    cmd = [PY, str(ROOT / "scripts" / name), *map(str, args)]
    if ranks:
        env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env['PATH']}"
        cmd = [str(Path(PY).parent / "mpirun"), "-n", str(ranks), *cmd]
    return cmd, env


def run_script(name: str, *args: str, timeout: float = 120, ranks: int = 0):
    """Run scripts/NAME to the end."""
    cmd, env = script_command(name, *args, ranks=ranks)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training with one thread: 2 cores are shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    logger.reset()


def make_loop(tmp_path: Path, data_path: Path, seed: int = 0, **kwargs) -> TrainLoop:
    flags = tiny_flags(**kwargs.pop("model_flags", {}))
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**flags)
    logger.configure(str(tmp_path), format_strs=["csv"])
    data = load_data(
        data_dir=str(data_path),
        batch_size=kwargs.get("batch_size", 4),
        image_size=8,
        class_cond=flags["class_cond"],
        seed=seed,
        num_workers=0,
    )
    defaults = dict(
        batch_size=4,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=1000,
        resume_checkpoint="",
        seed=seed,
    )
    defaults.update(kwargs)
    return TrainLoop(model=model, diffusion=diffusion, data=data, **defaults)


# ------------------------------------------------------------------------ training loop


def test_loss_falls_on_learnable_data(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    loop = make_loop(tmp_path / "run", data, max_steps=40, model_flags=dict(learn_sigma=False))
    loop.run_loop()
    with open(tmp_path / "run" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert {"loss_q0", "loss_q3", "mse", "grad_norm", "param_norm", "samples"} <= set(rows[0])
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_microbatches_give_the_full_batch_gradient(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    grads = []
    for mb in (-1, 1, 3):
        loop = make_loop(tmp_path / f"run{mb}", data, microbatch=mb, input_perturbation=0.1)
        loop.forward_backward(*next(loop.data))
        grads.append(torch.cat([p.grad.reshape(-1) for p in loop.model.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)


def test_input_perturbation_changes_training_but_not_the_target(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    out = {}
    for gamma in (0.0, 0.1):
        loop = make_loop(tmp_path / f"run{gamma}", data, max_steps=1, input_perturbation=gamma)
        loop.run_loop()
        out[gamma] = torch.cat([p.detach().reshape(-1) for p in loop.model.parameters()])
    assert not torch.equal(out[0.0], out[0.1])


def test_lr_anneals_linearly_and_stops(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    loop = make_loop(tmp_path / "run", data, lr=1e-3, lr_anneal_steps=4)
    loop.run_loop()
    assert loop.global_step == 4
    with open(tmp_path / "run" / "progress.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(lrs, [1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert (tmp_path / "run" / "model000004.pt").exists()


def test_compiled_training_matches_eager_and_saves_plain_keys(tmp_path, monkeypatch):
    """--compile wiring (dynamo with its eager backend: fast on CPU): same parameters as
    the eager loop, checkpoints with the official keys (no _orig_mod.)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    data = write_npz(tmp_path / "d.npz")
    params = []
    for compile_model in (False, True):
        run = tmp_path / f"run{compile_model}"
        loop = make_loop(run, data, microbatch=2, max_steps=2, compile=compile_model)
        loop.run_loop()
        params.append(load(run / "model000002.pt"))
    assert list(params[1]) == list(params[0])
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=0, atol=1e-6)


def test_device_means_by_quartile():
    m = DeviceMeans()
    logger.configure(None, format_strs=[])
    t = torch.tensor([0, 4, 9, 10, 19])
    m.add_by_quartile("loss", t, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 20)
    m.add_by_quartile("loss", torch.tensor([0]), torch.tensor([3.0]), 20)
    m.flush()
    kvs = logger.getkvs()
    assert kvs["loss"] == pytest.approx(3.0)
    assert (kvs["loss_q0"], kvs["loss_q1"], kvs["loss_q2"], kvs["loss_q3"]) == (2.0, 3.0, 4.0, 5.0)


def test_helpers():
    assert parse_resume_step_from_filename("/a/b/model012345.pt") == 12345
    with pytest.raises(ValueError, match="modelNNNNNN"):
        parse_resume_step_from_filename("/a/b/ema_0.9999_000010.pt")
    assert parse_ema_rates("0.9999,0.99") == [0.9999, 0.99]
    with pytest.raises(ValueError, match="ema_rate"):
        parse_ema_rates("1.5")
    assert step_seed(0, 0, 1) != step_seed(0, 1, 1) != step_seed(0, 0, 2)
    assert step_seed(3, 1, 7) == step_seed(3, 1, 7)


def test_log_loss_dict_keeps_the_original_three_arguments():
    """guided-diffusion's call: means through logger.logkv_mean, by quartile of t."""
    logger.configure(None, format_strs=[])
    diffusion = SimpleNamespace(num_timesteps=20)
    t = torch.tensor([0, 4, 9, 10, 19])
    log_loss_dict(diffusion, t, {"loss": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])})
    kvs = logger.getkvs()
    assert kvs["loss"] == pytest.approx(3.0)
    assert [kvs[f"loss_q{q}"] for q in range(4)] == pytest.approx([1.5, 3.0, 4.0, 5.0])


def test_find_resume_checkpoint_hook(tmp_path, monkeypatch):
    """The original's hook: None without arguments; the latest model file of a folder; and a
    loop resumes from what an overriding hook returns."""
    assert find_resume_checkpoint() is None
    assert find_resume_checkpoint(str(tmp_path)) is None
    data = write_npz(tmp_path / "d.npz")
    make_loop(tmp_path / "run", data, max_steps=2, save_interval=1).run_loop()
    (tmp_path / "run" / "model_best.pt").write_bytes(b"")
    latest = str(tmp_path / "run" / "model000002.pt")
    assert find_resume_checkpoint(str(tmp_path / "run")) == latest

    monkeypatch.setattr(train_util, "find_resume_checkpoint", lambda: latest)
    loop = make_loop(tmp_path / "other", data, max_steps=2, seed=1)
    assert loop.resume_step == 2 and loop.resume_checkpoint == latest
    saved = load(tmp_path / "run" / "model000002.pt")
    for k, v in loop.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


# ----------------------------------------------------------------------- mixed precision


class TinyHalfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def convert_to_fp16(self):
        self.lin.half()

    def forward(self, x):
        return self.lin(x.half()).float() * self.scale


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model = TinyHalfNet()
    init = {k: v.clone() for k, v in model.state_dict().items()}  # fp32
    mp = MixedPrecisionTrainer(
        model=model, use_fp16=True, fp16_scale_growth=0.25, initial_lg_loss_scale=8.0
    )
    assert model.lin.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in mp.master_params)
    opt = torch.optim.SGD(mp.master_params, lr=0.1)
    master_before = [p.detach().clone() for p in mp.master_params]
    model_before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3)

    mp.zero_grad()
    mp.backward(model(x).sum())
    model.lin.weight.grad[0, 0] = float("inf")  # an overflow in the fp16 gradients
    assert mp.optimize(opt) is False
    assert mp.lg_loss_scale == 7.0
    for a, b in zip(master_before, mp.master_params):
        assert torch.equal(a, b)
    for a, b in zip(model_before, model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in mp.master_params)

    # a good step: gradients unscaled, fp32 master updated and copied to the fp16 model
    mp.zero_grad()
    mp.backward(model(x).sum())
    assert mp.optimize(opt) is True
    assert mp.lg_loss_scale == 7.25
    ref = TinyHalfNet()
    ref.load_state_dict(init)
    (nn.functional.linear(x, ref.lin.weight, ref.lin.bias) * ref.scale).sum().backward()
    state = mp.master_params_to_state_dict(mp.master_params)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state[name], p - 0.1 * p.grad, atol=2e-3, rtol=0)
    torch.testing.assert_close(model.lin.weight, state["lin.weight"].half())
    assert torch.isfinite(mp.grad_norm)


def test_master_params_round_trip_through_a_state_dict():
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**tiny_flags())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    mp = MixedPrecisionTrainer(model=model, use_fp16=True)
    state = mp.master_params_to_state_dict(mp.master_params)
    assert list(state) == list(reference)
    for k in reference:
        assert state[k].dtype == torch.float32 and torch.equal(state[k], reference[k]), k
    again = mp.state_dict_to_master_params(state)
    for a, b in zip(again, mp.master_params):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- checkpoints


def test_atomic_save_leaves_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "model000010.pt"
    atomic_save({"w": torch.ones(3)}, str(path))
    real_save = torch.save

    def crashing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(3)}, str(path))
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(3)}, str(tmp_path / "model000020.pt"))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model000010.pt"]


def assert_same_files(dir_a: Path, dir_b: Path, names) -> None:
    for name in names:
        a, b = load(dir_a / name), load(dir_b / name)
        assert list(a) == list(b), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name} {k}")


def snapshot(folder: Path) -> dict:
    """The bytes of every checkpoint and flags file in ``folder`` (the logs are appended to)."""
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".pt", ".json")
    }


def run_flags(log_dir: Path, **overrides) -> argparse.Namespace:
    """The flags of a tiny image_train.py run in ``log_dir`` (as the script parses them)."""
    flags = flag_defaults(TRAIN_FLAGS + MODEL_FLAGS + DIFFUSION_FLAGS, **GROUP_DEFAULTS["train"])
    flags.update(TINY, data_dir="d.npz", log_dir=str(log_dir), **overrides)
    return argparse.Namespace(**flags)


def test_a_rerun_resumes_its_run_and_never_overwrites_another(tmp_path):
    """prepare_run's policy on a folder (files stand in for a run): resume from the latest
    checkpoint when the flags match up to the ignored ones (max_steps...), from the given
    checkpoint when it is the latest; refuse, naming the differing flags and the fixes,
    whatever would overwrite another run's files. save_flags never overwrites a record."""
    run = tmp_path / "run"
    args = run_flags(run)
    assert prepare_run(args) == ""  # an empty folder: step 0
    run.mkdir()
    save_flags(args)
    assert prepare_run(args) == ""  # flags.json and no checkpoint yet: restart it
    for step in (3, 6):
        (run / f"model{step:06d}.pt").write_bytes(b"")
    latest = str(run / "model000006.pt")
    assert prepare_run(run_flags(run, max_steps=9, log_interval=5)) == latest

    def refusal(folder: Path = run, **overrides) -> str:
        with pytest.raises(UserError) as e:
            prepare_run(run_flags(folder, **overrides))
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = refusal(lr=2e-3, batch_size=2)
    assert "--batch_size 1 there, 2 now; --lr 0.0001 there, 0.002 now" in msg
    assert f"pass --resume_checkpoint {latest} to continue" in msg and "new --log_dir" in msg
    # an older --resume_checkpoint of the same run continues from the latest (same result)
    older = str(run / "model000003.pt")
    assert prepare_run(run_flags(run, resume_checkpoint=older)) == latest
    assert "beyond" in refusal(resume_checkpoint=older, lr=2e-3)

    # the named fix: continue from the latest checkpoint with the new flags, recorded apart
    new = run_flags(run, lr=2e-3, resume_checkpoint=latest)
    assert prepare_run(new) == latest
    save_flags(new)
    assert json.loads((run / "flags.json").read_text())["lr"] == 1e-4
    assert json.loads((run / "flags_resume_000006.json").read_text())["lr"] == 2e-3
    (run / "model000009.pt").write_bytes(b"")
    # rerunning that command (preempted at step 9) resumes from step 9, not from 6
    assert prepare_run(new) == str(run / "model000009.pt")
    assert "--lr 0.002 there, 0.0001 now" in refusal()
    save_flags(new)  # the same flags as the newest record: nothing new is written
    assert sorted(p.name for p in run.glob("flags*")) == ["flags.json", "flags_resume_000006.json"]

    (run / "flags.json").unlink()
    (run / "flags_resume_000006.json").unlink()
    assert "but no flags.json" in refusal()
    other = tmp_path / "other"
    other.mkdir()
    save_flags(run_flags(other, seed=1))
    assert "saved no checkpoint" in refusal(other)


def test_log_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    out = run_script("image_train.py", f"--data_dir={tmp_path}", f"--log_dir={f}")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"--log_dir {f} is a file" in out.stderr and f.read_text() == "x"


# ------------------------------------------------------------------------- preemption

TINY_RUN = cli_flags(TINY) + [
    "--batch_size=2",
    "--ema_rate=0.9",
    "--lr=1e-3",
    "--log_interval=1",
    "--save_interval=1000",
    "--num_workers=0",
]


def start_and_signal(cmd, env, sig, after: str, pid=None, umask=None):
    """Start ``cmd``, wait until its stdout shows ``after``, send ``sig`` (to ``pid(proc)``
    when given, else to the process) and return (returncode, stdout, stderr)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if after in line or not line:
            break
    os.kill(proc.pid if pid is None else pid(proc), sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, err


def test_sigterm_saves_the_step_and_the_rerun_ends_like_the_uninterrupted_run(tmp_path):
    """Through the script: a SIGTERM saves the running step (files with the user's umask),
    exit 143 with one line; the same command resumes there, leaves the saved files alone and
    ends equal to the run that was never stopped (EMA, loss-aware sampler, microbatches,
    DDPM-IP, dropout, labels); other flags in that folder are refused in one line."""
    data = write_npz(tmp_path / "d.npz")
    flags = tiny_flags(class_cond=True, num_classes=2, dropout=0.1)
    args = cli_flags(flags) + [
        f"--data_dir={data}",
        "--batch_size=4",
        "--microbatch=2",
        "--ema_rate=0.9,0.99",
        "--lr=1e-3",
        "--lr_anneal_steps=20",
        "--input_perturbation=0.1",
        "--schedule_sampler=loss-second-moment",
        "--save_interval=1000",
        "--log_interval=1",
        "--num_workers=0",
        "--max_steps=6",
    ]
    run, whole = tmp_path / "run", tmp_path / "whole"
    cmd, env = script_command("image_train.py", *args, f"--log_dir={run}")
    rc, out, err = start_and_signal(cmd, env, signal.SIGTERM, after="| step ", umask=0o022)
    assert rc == 143 and "Traceback" not in err, err
    m = re.search(r"preempted at step (\d+): saved (\S+); rerun the same command to resume", err)
    assert m and err.strip().splitlines()[-1].startswith("image_train.py: preempted"), err
    step = int(m.group(1))
    assert 1 <= step < 6 and m.group(2) == str(run / f"model{step:06d}.pt")
    assert sorted(p.name for p in run.glob("model*.pt")) == [f"model{step:06d}.pt"]
    for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", "flags.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    saved = snapshot(run)

    again = run_script("image_train.py", *args, f"--log_dir={run}")
    assert again.returncode == 0 and f"resuming from {m.group(2)}" in again.stdout, again.stderr
    after = snapshot(run)
    assert all(after[k] == v for k, v in saved.items())
    assert not any(name.startswith("flags_resume") for name in after)  # the same flags
    with open(run / "progress.csv") as f:  # the log continues where the first run stopped
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    out = run_script("image_train.py", *args, f"--log_dir={whole}")
    assert out.returncode == 0, out.stderr
    names = ["model000006.pt", "ema_0.9_000006.pt", "ema_0.99_000006.pt"]
    assert_same_files(whole, run, names)
    sa = load(whole / "state000006.pt")["schedule_sampler"]
    sb = load(run / "state000006.pt")["schedule_sampler"]
    assert torch.equal(sa["loss_history"], sb["loss_history"]) and sa["loss_counts"].sum() > 0

    refused = run_script("image_train.py", *args, f"--log_dir={run}", "--lr=2e-3")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "--lr 0.001 there, 0.002 now" in refused.stderr, refused.stderr
    assert f"--resume_checkpoint {run / 'model000006.pt'}" in refused.stderr
    assert snapshot(run) == after

    # the saved flags rebuild the model: the checkpoint loads with strict=True
    saved_flags = json.loads((run / "flags.json").read_text())
    assert saved_flags["input_perturbation"] == 0.1 and saved_flags["max_steps"] == 6
    model, _ = create_model_and_diffusion(
        **{k: saved_flags[k] for k in model_and_diffusion_defaults()}
    )
    model.load_state_dict(load(run / "ema_0.99_000006.pt"), strict=True)
    assert {v.dtype for v in load(run / "model000006.pt").values()} == {torch.float32}


def _rank_pid(mpirun_pid: int, rank: int) -> int:
    """The pid of MPI rank ``rank`` among the descendants of ``mpirun_pid`` (Linux /proc)."""
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, found = [mpirun_pid], []
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                environ = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if {f"PMI_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()} & set(
                environ
            ):
                found.append(child)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigterm_and_ctrl_c_under_mpirun(tmp_path):
    """2 ranks: a SIGTERM to rank 1 alone stops both ranks at the same step (they agree
    every 10 steps), saved, exit 143, one line; the rerun of the same command resumes there;
    Ctrl-C (SIGINT to mpirun) prints one line, exit 130, no traceback, no MPICH banner."""
    data = write_npz(tmp_path / "d.npz")
    args = [*TINY_RUN, f"--data_dir={data}", "--max_steps=1000", f"--log_dir={tmp_path / 'run'}"]
    cmd, env = script_command("image_train.py", *args, ranks=2)
    rc, out, err = start_and_signal(
        cmd, env, signal.SIGTERM, after="| step ", pid=lambda p: _rank_pid(p.pid, 1)
    )
    assert rc == 143 and "Traceback" not in err and "BAD TERMINATION" not in out + err, err
    saved = tmp_path / "run" / "model000010.pt"
    assert err.count(f"preempted at step 10: saved {saved}; rerun the same command") == 1, err
    assert sorted(p.name for p in (tmp_path / "run").glob("model*.pt")) == [saved.name]

    rc, out, err = start_and_signal(cmd, env, signal.SIGINT, after="| step ")
    assert f"resuming from {saved}" in out, out
    assert rc == 130 and "Traceback" not in err and "BAD TERMINATION" not in out + err, err
    assert err.count("interrupted; rerun the same command to resume") == 1, err


def test_fp16_resume_restores_master_params_optimizer_and_loss_scale(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    opts = dict(use_fp16=True, fp16_scale_growth=0.5, ema_rate="0.9", save_interval=2)
    make_loop(tmp_path / "full", data, max_steps=4, **opts).run_loop()
    resume = str(tmp_path / "full" / "model000002.pt")
    make_loop(tmp_path / "resumed", data, max_steps=4, resume_checkpoint=resume, **opts).run_loop()
    for name in ("model000004.pt", "ema_0.9_000004.pt", "state000004.pt"):
        a, b = load(tmp_path / "full" / name), load(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name} {k}")
    assert load(tmp_path / "full" / "state000004.pt")["lg_loss_scale"] == 22.0
    assert load(tmp_path / "resumed" / "state000004.pt")["lg_loss_scale"] == 22.0
    assert len(load(tmp_path / "full" / "opt000004.pt")["state"]) == 2  # 2 flat master groups


def test_resume_under_mpirun_keeps_ranks_identical(tmp_path):
    """2 ranks (gloo): parameters and EMA agree across ranks; resuming does not hang."""
    data = write_npz(tmp_path / "d.npz")
    worker = tmp_path / "worker.py"
    worker.write_text(MPI_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env['PATH']}"
    mpirun = str(Path(PY).parent / "mpirun")

    def run(log_dir, resume=""):
        cmd = [mpirun, "-n", "2", PY, str(worker), str(data), str(log_dir), resume]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads((Path(log_dir) / "ranks.json").read_text())

    full = run(tmp_path / "full")
    assert full["same_across_ranks"] and full["step"] == 4
    resumed = run(tmp_path / "resumed", str(tmp_path / "full" / "model000002.pt"))
    assert resumed["same_across_ranks"] and resumed["step"] == 4
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        a, b = load(tmp_path / "full" / name), load(tmp_path / "resumed" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


MPI_WORKER = f"""
import hashlib, json, sys
import torch
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop

data_path, log_dir, resume = sys.argv[1], sys.argv[2], sys.argv[3]
dist_util.setup_dist()
logger.configure(log_dir)
flags = model_and_diffusion_defaults()
flags.update({TINY!r})
torch.manual_seed(dist_util.get_rank())  # different inits: rank 0's must win
model, diffusion = create_model_and_diffusion(**flags)
data = load_data(data_dir=data_path, batch_size=2, image_size=8, seed=0, num_workers=0)
loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1,
                 lr=1e-3, ema_rate="0.9", log_interval=2, save_interval=2,
                 resume_checkpoint=resume, max_steps=4)
loop.run_loop()
digest = hashlib.sha256()
for p in list(model.parameters()) + loop.ema_params[0]:
    digest.update(p.detach().numpy().tobytes())
digests = dist_util.all_gather_object(digest.hexdigest())
if dist_util.get_rank() == 0:
    with open(log_dir + "/ranks.json", "w") as f:
        json.dump({{"same_across_ranks": len(set(digests)) == 1, "step": loop.global_step}}, f)
dist_util.cleanup()
"""


# ------------------------------------------------------------------ other entry points


def test_bad_data_gives_a_one_line_error(tmp_path):
    missing = run_script("image_train.py", *cli_flags(tiny_flags()), f"--data_dir={tmp_path}/nope")
    assert missing.returncode != 0
    assert missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr

    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((4, 8, 8), dtype=np.float32))
    out = run_script(
        "classifier_train.py",
        "--image_size=8",
        "--classifier_channel_mult=1,2",
        f"--data_dir={bad}",
        f"--log_dir={tmp_path}/c",
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "arr_0 must be uint8" in out.stderr


def test_schedule_sampler_state_is_seeded_per_step():
    from guided_diffusion.train_util import seed_step

    _, diffusion = create_model_and_diffusion(**tiny_flags())
    a = create_named_schedule_sampler("uniform", diffusion, seed=0)
    b = create_named_schedule_sampler("uniform", diffusion, seed=123)

    seed_step(5, 7, a)
    ta, _ = a.sample(8, "cpu")
    na = torch.randn(3)
    seed_step(5, 7, b)
    tb, _ = b.sample(8, "cpu")
    assert torch.equal(ta, tb) and torch.equal(na, torch.randn(3))
