"""Tests of the training loop, mixed precision, checkpoints and resumption (tiny CPU models)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import (
    DeviceMeans,
    TrainLoop,
    atomic_save,
    parse_ema_rates,
    parse_resume_step_from_filename,
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


def run_script(name: str, *args: str, timeout: float = 120, ranks: int = 0):
    """Run scripts/NAME with one thread per process (2 shared cores: no OpenMP spinning)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OPENAI_LOGDIR", None)
    cmd = [PY, str(ROOT / "scripts" / name), *args]
    if ranks:
        env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env['PATH']}"
        cmd = [str(Path(PY).parent / "mpirun"), "-n", str(ranks), *cmd]
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


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Through the script: stop at step 3 and resume to 6 == train to 6 in one go."""
    data = write_npz(tmp_path / "d.npz")
    flags = tiny_flags(class_cond=True, num_classes=2, dropout=0.1)
    common = cli_flags(flags) + [
        f"--data_dir={data}",
        "--batch_size=4",
        "--microbatch=2",
        "--ema_rate=0.9,0.99",
        "--lr=1e-3",
        "--lr_anneal_steps=20",
        "--input_perturbation=0.1",
        "--schedule_sampler=loss-second-moment",
        "--save_interval=3",
        "--log_interval=3",
        "--max_steps=6",
        "--num_workers=0",
    ]
    full = run_script("image_train.py", *common, f"--log_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    resumed = run_script(
        "image_train.py",
        *common,
        f"--log_dir={tmp_path / 'resumed'}",
        f"--resume_checkpoint={tmp_path / 'full' / 'model000003.pt'}",
    )
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model000006.pt", "ema_0.9_000006.pt", "ema_0.99_000006.pt"):
        a, b = load(tmp_path / "full" / name), load(tmp_path / "resumed" / name)
        assert list(a) == list(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name} {k}")
    sa = load(tmp_path / "full" / "state000006.pt")["schedule_sampler"]
    sb = load(tmp_path / "resumed" / "state000006.pt")["schedule_sampler"]
    assert torch.equal(sa["loss_history"], sb["loss_history"]) and sa["loss_counts"].sum() > 0

    # the saved flags rebuild the model: the checkpoint loads with strict=True
    saved = json.loads((tmp_path / "full" / "flags.json").read_text())
    assert saved["input_perturbation"] == 0.1 and saved["max_steps"] == 6
    model, _ = create_model_and_diffusion(**{k: saved[k] for k in model_and_diffusion_defaults()})
    model.load_state_dict(load(tmp_path / "full" / "ema_0.99_000006.pt"), strict=True)
    assert {v.dtype for v in load(tmp_path / "full" / "model000006.pt").values()} == {torch.float32}


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
