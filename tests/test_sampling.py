"""scripts/image_sample.py and scripts/classifier_sample.py, end to end under mpirun."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GOLDEN, ROOT, load_json

SEED_README = ROOT / "tests" / "fixtures" / "original_readme_commands.txt"
MPIRUN = str(Path(sys.executable).parent / "mpirun")
LAYOUTS = {c["name"]: c for c in load_json("adm_checkpoint_layouts.json")["configs"]}

TINY = (
    "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 16,8 --num_head_channels 16 --use_new_attention_order True "
    "--resblock_updown True --learn_sigma True --noise_schedule cosine "
    "--use_scale_shift_norm True"
).split()
CLF = (
    "--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 "
    "--classifier_channel_mult 1,2 --classifier_scale 2.0"
).split()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_script(script, args, n=None, check=True, timeout=300):
    cmd = [sys.executable, str(ROOT / "scripts" / script), *map(str, args)]
    if n is not None:
        cmd = [MPIRUN, "-n", str(n), *cmd]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_samples(log_dir, n, size=16):
    with np.load(Path(log_dir) / f"samples_{n}x{size}x{size}x3.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    state = torch.load(GOLDEN / "model.pt", weights_only=True)
    torch.save(state, d / "ema_0.9999_000010.pt")  # an EMA file name, as training writes
    torch.save(torch.load(GOLDEN / "classifier.pt", weights_only=True), d / "classifier.pt")
    return d


# --------------------------------------------------------------- the README command lines


def readme_commands():
    """The five sampling commands of the original README, joined to one line each."""
    text = SEED_README.read_text()
    cmds = []
    for block in re.findall(r"```shell\n(.*?)```", text, flags=re.S):
        line = block.replace("\\\n", " ").replace("```", " ")
        cmds.append(shlex.split(line))
    return cmds


README_MODELS = [
    "cifar10_uncond_32",
    "lsun_tower_64",
    "ffhq_128",
    "imagenet64_cond",
    "imagenet128_cond",
]


@pytest.mark.parametrize("index", range(5), ids=README_MODELS)
def test_readme_command_parses_and_builds_official_layout(index):
    import importlib.util

    cmd = readme_commands()[index]
    assert cmd[:4] == ["mpirun", "-n", "1", "python"]
    script = cmd[4]
    spec = importlib.util.spec_from_file_location("s", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.create_argparser().parse_args(cmd[5:])
    from guided_diffusion.sample_util import build_diffusion
    from guided_diffusion.script_util import (
        create_model_and_diffusion,
        model_and_diffusion_defaults,
    )

    flags = {k: getattr(args, k) for k in model_and_diffusion_defaults()}
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    layout = LAYOUTS[README_MODELS[index]]
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k, list(s)) for k, s in layout["state_dict"]]
    diffusion = build_diffusion(args)
    assert diffusion.num_timesteps == 100
    assert diffusion.eps_scale[0] == layout["readme_sampling_flags"]["eps_scaler"]
    assert args.use_fp16 == layout["readme_sampling_flags"]["use_fp16"]
    if script.endswith("classifier_sample.py"):
        from guided_diffusion.script_util import classifier_defaults, create_classifier

        cflags = {k: getattr(args, k) for k in classifier_defaults()}
        with torch.device("meta"):
            clf = create_classifier(**cflags)
        want = LAYOUTS["imagenet128_classifier"]["state_dict"]
        assert [(k, list(v.shape)) for k, v in clf.state_dict().items()] == [
            (k, list(s)) for k, s in want
        ]
        assert args.classifier_scale == 0.5


# --------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "sampler,lam",
    [
        ("ddpm", ["--eps_scaler", "1.017"]),
        ("ddim", ["--eps_scaler", "1.005", "--eps_scaler_k", "0.002"]),
    ],
)
def test_image_sample_two_ranks_equals_one_rank(ckpt, tmp_path, sampler, lam):
    common = [
        *TINY,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--timestep_respacing",
        "ddim10" if sampler == "ddim" else "10",
        "--use_ddim",
        str(sampler == "ddim"),
        "--num_samples",
        10,
        "--batch_size",
        3,
        "--seed",
        7,
        *lam,
    ]
    run_script("image_sample.py", [*common, "--log_dir", tmp_path / "n1"], n=1)
    run_script("image_sample.py", [*common, "--log_dir", tmp_path / "n2"], n=2)
    a, b = load_samples(tmp_path / "n1", 10), load_samples(tmp_path / "n2", 10)
    assert set(a) == {"arr_0"}
    assert a["arr_0"].shape == (10, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # independent of the world size
    flat = a["arr_0"].reshape(10, -1)
    assert len({row.tobytes() for row in flat}) == 10  # every image differs
    assert (tmp_path / "n2" / "samples_10x16x16x3.png").exists()
    flags = json.loads((tmp_path / "n2" / "samples_10x16x16x3_flags.json").read_text())
    assert flags["eps_scaler"] == float(lam[1]) and flags["num_samples"] == 10
    assert not (tmp_path / "n2" / "shards").exists()


def test_seed_reproducible_and_eps_scaler_matters(ckpt, tmp_path):
    common = [
        *TINY,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--timestep_respacing",
        "10",
        "--num_samples",
        4,
        "--batch_size",
        4,
        "--progress",
        "False",
    ]
    run_script("image_sample.py", [*common, "--seed", 1, "--log_dir", tmp_path / "a"])
    run_script("image_sample.py", [*common, "--seed", 1, "--log_dir", tmp_path / "b"])
    run_script("image_sample.py", [*common, "--seed", 2, "--log_dir", tmp_path / "c"])
    run_script(
        "image_sample.py", [*common, "--seed", 1, "--eps_scaler", 1.05, "--log_dir", tmp_path / "d"]
    )
    a, b, c, d = (load_samples(tmp_path / x, 4)["arr_0"] for x in "abcd")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_classifier_sample_ddpm_and_ddim(ckpt, tmp_path):
    common = [
        *TINY,
        *CLF,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--classifier_path",
        ckpt / "classifier.pt",
        "--num_samples",
        5,
        "--batch_size",
        2,
        "--seed",
        3,
    ]
    run_script(
        "classifier_sample.py",
        [*common, "--timestep_respacing", "10", "--eps_scaler", 1.017, "--log_dir", tmp_path / "p"],
        n=2,
    )
    run_script(
        "classifier_sample.py",
        [
            *common,
            "--timestep_respacing",
            "ddim10",
            "--use_ddim",
            True,
            "--eps_scaler",
            1.005,
            "--eps_scaler_k",
            0.002,
            "--log_dir",
            tmp_path / "d",
        ],
        n=1,
    )
    p, d = load_samples(tmp_path / "p", 5), load_samples(tmp_path / "d", 5)
    assert p["arr_0"].shape == d["arr_0"].shape == (5, 16, 16, 3)
    assert p["arr_1"].dtype == np.int64 and p["arr_1"].max() < 1000
    assert not np.array_equal(p["arr_0"], d["arr_0"])


def test_kill_and_resume_gives_the_uninterrupted_result(ckpt, tmp_path):
    common = [
        *TINY,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--timestep_respacing",
        "10",
        "--num_samples",
        24,
        "--batch_size",
        2,
        "--seed",
        5,
        "--progress",
        "False",
    ]
    run_script("image_sample.py", [*common, "--log_dir", tmp_path / "full"], n=1)
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/image_sample.py"),
        *map(str, common),
        "--log_dir",
        str(killed),
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shards = killed / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("batch_*.npz"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("batch_*.npz")))
    assert 3 <= done < 12, "the kill must land mid-run"
    assert not (killed / "samples_24x16x16x3.npz").exists()
    out = run_script("image_sample.py", [*common, "--log_dir", killed], n=1)
    assert f"resuming: {done * 2} of 24 samples" in out.stdout
    np.testing.assert_array_equal(
        load_samples(killed, 24)["arr_0"], load_samples(tmp_path / "full", 24)["arr_0"]
    )
    again = run_script("image_sample.py", [*common, "--log_dir", killed], n=1)
    assert "nothing to do" in again.stdout


# --------------------------------------------------------------- bad input


def _error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--eps_scaler", "0"], "must be positive"),
        (
            ["--eps_scaler", "1.0", "--eps_scaler_k", "-0.5"],
            r"lambda_2 = 0 .*--eps_scaler_k > -0\.1111",
        ),
        (["--num_samples", "0"], "--num_samples must be positive"),
        (["--timestep_respacing", "ddim7x"], "invalid timestep_respacing"),
        (["--timestep_respacing", "2000"], "cannot take 2000 steps"),
        (
            ["--num_channels", "64", "--learn_sigma", "False"],
            r"--learn_sigma False \(checkpoint: True, 6 output channels\); "
            r"--num_channels 64 \(checkpoint: 32\)",
        ),
        (
            ["--image_size", "32", "--channel_mult", ""],
            r"--channel_mult 1,2,2,2 from --image_size 32 \(checkpoint: 1,2\)",
        ),
        (["--attention_resolutions", "8"], r"--attention_resolutions 8 \(checkpoint: 16,8"),
        (["--class_cond", "True"], r"--class_cond True \(checkpoint: False\)"),
    ],
)
def test_bad_input_one_line_errors(ckpt, tmp_path, extra, match):
    args = [
        *TINY,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--timestep_respacing",
        "10",
        "--num_samples",
        2,
        "--log_dir",
        tmp_path,
        *extra,
    ]
    line = _error(run_script("image_sample.py", args, check=False))
    assert re.search(match, line), line


def test_missing_and_unsafe_checkpoints(ckpt, tmp_path):
    base = [*TINY, "--timestep_respacing", "10", "--num_samples", 2, "--log_dir", tmp_path]
    line = _error(
        run_script("image_sample.py", [*base, "--model_path", tmp_path / "nope.pt"], check=False)
    )
    assert "checkpoint not found" in line and "nope.pt" in line

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    proc = run_script("image_sample.py", [*base, "--model_path", tmp_path / "evil.pt"], check=False)
    assert "cannot read checkpoint" in _error(proc) and "pwned" not in proc.stdout
    (tmp_path / "trunc.pt").write_bytes((ckpt / "ema_0.9999_000010.pt").read_bytes()[:1000])
    line = _error(
        run_script("image_sample.py", [*base, "--model_path", tmp_path / "trunc.pt"], check=False)
    )
    assert "cannot read checkpoint" in line
    line = _error(
        run_script(
            "classifier_sample.py",
            [
                *base,
                "--model_path",
                ckpt / "ema_0.9999_000010.pt",
                "--classifier_path",
                ckpt / "classifier.pt",
                *CLF,
                "--classifier_width",
                64,
                "--num_classes",
                10,
            ],
            check=False,
        )
    )
    assert "classifier checkpoint" in line and "does not match the flags" in line
    assert "--classifier_width 64 (checkpoint: 32); --num_classes 10 (checkpoint: 1000)" in line


def test_rerun_with_other_flags_in_same_log_dir_is_refused(ckpt, tmp_path):
    common = [
        *TINY,
        "--model_path",
        ckpt / "ema_0.9999_000010.pt",
        "--timestep_respacing",
        "10",
        "--num_samples",
        2,
        "--batch_size",
        2,
        "--log_dir",
        tmp_path,
    ]
    run_script("image_sample.py", common)
    line = _error(run_script("image_sample.py", [*common, "--eps_scaler", 1.01], check=False))
    assert "--eps_scaler 1.0 there vs 1.01 now" in line
    assert load_samples(tmp_path, 2)["arr_0"].shape == (2, 16, 16, 3)  # the first run is kept


def test_rank0_only_failure_reaches_every_rank(tmp_path):
    """A checkpoint path that rank 0 cannot read stops both ranks with the same one line."""
    args = [
        *TINY,
        "--model_path",
        tmp_path,
        "--timestep_respacing",
        "10",
        "--num_samples",
        2,
        "--log_dir",
        tmp_path / "out",
    ]
    proc = run_script("image_sample.py", args, n=2, check=False, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 2 and len(set(lines)) == 1, proc.stderr
    assert "cannot read checkpoint" in lines[0] and "gloo" not in proc.stderr


def test_no_model_path_samples_from_the_bundled_model(tmp_path):
    """mpirun -n 1 python scripts/image_sample.py without --model_path: the bundled model."""
    meta = json.loads((ROOT / "models" / "adm_fmnist32.json").read_text())
    args = [
        "--num_samples",
        3,
        "--batch_size",
        3,
        "--timestep_respacing",
        4,
        "--log_dir",
        tmp_path,
        "--use_fp16",
        True,
    ]
    proc = run_script("image_sample.py", args, n=1)
    assert "no --model_path: sampling from the bundled Fashion-MNIST" in proc.stdout
    assert "--use_fp16 True is ignored on cpu" in proc.stderr
    arr = load_samples(tmp_path, 3, size=meta["flags"]["image_size"])["arr_0"]
    assert arr.shape == (3, 32, 32, 3)
    flags = json.loads((tmp_path / "samples_3x32x32x3_flags.json").read_text())
    assert flags["num_channels"] == meta["flags"]["num_channels"]
    assert flags["timestep_respacing"] == "4"  # the command line wins over the bundled default
