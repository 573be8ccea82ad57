"""The exposure-bias study: when does Epsilon Scaling help? (docs/exposure_study.md)

    python scripts/exposure_study.py --out_dir runs/exposure_study \
        --settings 'bundled_10:bundled:10 bundled_20:bundled:20:400:0.96,0.98,1,1.02'

Each of --settings LABEL:MODEL:STEPS[:N[:GRID]] (MODEL: ``bundled`` or a checkpoint of the
bundled architecture, e.g. runs/x/ema_0.998_002000.pt) samples the same N seeds (default
--num_samples) with DDPM at every eps scaler lambda of GRID (default --lambdas; 1 is always
added) and reports, with paired bootstrap intervals: FID(lambda) against --ref_batch on the
Fashion-MNIST feature net, the FID-optimal lambda, the eps-norm gap to the training curve,
the lambda each calibration objective picks (norm matching and the alternatives of
``exposure_study.OBJECTIVES``) and the effective noise level of the sampler's inputs
(``noise_level``). Resumable: every batch is kept under OUT/runs/<hash>/; a rerun with the
same flags recomputes nothing. Writes OUT/results.json (merged over runs), OUT/tables.md,
OUT/LABEL.png per setting and OUT/summary.png.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evaluations.evaluator import Evaluator, load_feature_net
from guided_diffusion import exposure_study as es
from guided_diffusion import noise_level as nl
from guided_diffusion.cli import UserError, bundled_model_args, cli, progress_bar, start_script
from guided_diffusion.fast_path import cpu_supports_fast_bf16
from guided_diffusion.flags import make_parser
from guided_diffusion.image_datasets import data_share
from guided_diffusion.io_util import file_sha256, settings_folder, write_json_atomic
from guided_diffusion.plots import plot_study_setting, plot_study_summary
from guided_diffusion.sample_util import build_diffusion, load_sampling_model

DEFAULTS = dict(
    lambdas="0.94,0.96,0.98,1,1.02",
    num_samples=500,
    batch_size=128,
    data_dir="data/fmnist/fmnist_train.npz",
    ref_batch="data/fmnist/fmnist_test.npz",
    use_bf16=True,
    out_dir="runs/exposure_study",
)
HELP = dict(
    out_dir="output folder of the study (rerun: resumes)",
    data_dir="Fashion-MNIST training .npz (training curve, data moments)",
    ref_batch="FID reference .npz (the Fashion-MNIST test split)",
    use_bf16="the trunk in bfloat16 on CPUs with AVX512-BF16/AMX (faster)",
)
NAMES = "settings out_dir lambdas num_samples batch_size seed train_samples data_samples "
NAMES += "data_dir ref_batch num_boot use_bf16"


def create_argparser() -> argparse.ArgumentParser:
    return make_parser(__doc__, NAMES.split(), help=HELP, **DEFAULTS)


def main() -> None:
    args = start_script(create_argparser(), "evaluate")
    try:
        specs = args.settings.split()
        settings = [es.parse_setting(s, args.num_samples, args.lambdas) for s in specs]
    except ValueError as e:
        raise UserError(str(e)) from None
    if not settings or len({s["label"] for s in settings}) < len(settings):
        raise UserError(f"--settings {args.settings!r}: give at least one, with distinct labels")
    for name in ("data_dir", "ref_batch"):
        if not Path(getattr(args, name)).exists():
            raise UserError(
                f"--{name} {getattr(args, name)} not found: prepare Fashion-MNIST with "
                "'python datasets/fashion_mnist.py --out_dir data/fmnist --no_png'"
            )
    out, device = Path(args.out_dir), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.use_bf16 and device.type == "cpu" and cpu_supports_fast_bf16()
    geometry = dict(image_size=32, class_cond=True, in_channels=1)
    n_data = max(args.data_samples, args.train_samples)
    _, x0, kw = next(
        data_share(args.data_dir, n_data, None, **geometry, rank=0, world=1, device=device)
    )
    data_rows = nl.state_stats(x0).numpy()
    ev = Evaluator(
        load_feature_net("fmnist", device=str(device)), 500, device=str(device), progress=False
    )
    with np.load(args.ref_batch) as z:
        ref = ev.reference(z["arr_0"])
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    bar = progress_bar(
        sum(s["num_samples"] * len(s["lambdas"]) for s in settings), "exposure study"
    )
    for s in settings:
        model_path = "" if s["model"] == "bundled" else s["model"]
        m = bundled_model_args(model_path, timestep_respacing=str(s["steps"]), use_bf16=bf16)
        model, diffusion = load_sampling_model(m, device), build_diffusion(m)
        ident = dict(
            model=file_sha256(m.model_path),
            steps=s["steps"],
            num_samples=s["num_samples"],
            seed=args.seed,
        )
        bar.set_postfix_str(f"{s['label']}: {s['steps']} steps")
        r = es.study_setting(
            settings_folder(out, ident),
            model,
            diffusion,
            s["lambdas"],
            num_samples=s["num_samples"],
            batch_size=args.batch_size,
            seed=args.seed,
            shape=(1, 32, 32),
            device=device,
            num_classes=m.num_classes,
            train_x0=x0[: args.train_samples],
            train_kwargs={k: v[: args.train_samples] for k, v in kw.items()},
            data_rows=data_rows,
            score=lambda images: ev.score(images, ref),
            ref_stats=ref.stats,
            num_boot=args.num_boot,
            progress=bar.update,
        )
        results[s["label"]] = {**r, "setting": {**s, "model_path": m.model_path, **ident}}
        write_json_atomic(path, results)
        plot_study_setting(
            out / f"{s['label']}.png",
            r,
            f"{s['label']}: {s['steps']} DDPM steps, {s['num_samples']} samples",
        )
    bar.close()
    plot_study_summary(out / "summary.png", results)
    tables = es.format_tables(results)
    (out / "tables.md").write_text(tables)
    print(tables, flush=True)


if __name__ == "__main__":
    cli(main)
