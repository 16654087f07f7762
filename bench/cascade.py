"""The cascade against its single stages, at the same training budget: 3d_fullres, 3d_lowres and
3d_lowres -> 3d_cascade_fullres on a synthetic CT set whose images are large for the plan (so the planner makes a
cascade), each trained for `--epochs` x `--iters` per fold, evaluated on the held-out test images. It prints the
mean foreground Dice (and per class) of each on the test images, and the wall time of each stage. Not a test:
whatever it shows is the figure.

What it does
------------
1. Writes `--cases` training and `--test` test CT cases of `--shape`, plans them for `--gpu-memory` GB (small, so
   the 3d_fullres patch covers little of the image and the planner adds 3d_lowres and the cascade), preprocesses
   3d_lowres and 3d_fullres.
2. Trains 3d_fullres on fold `--fold`; 3d_lowres on all five folds (the cascade needs every training case's
   cross-validation prediction; each fold's validation writes them); 3d_cascade_fullres on fold `--fold`.
   Every training run has the same schedule.
3. Predicts the test images with 3d_fullres, 3d_lowres (fold `--fold` only, like the others) and the cascade
   (given those 3d_lowres predictions as its first stage), and evaluates each against the test labels.

The cascade's first stage costs five trainings here (the reference's price too); the "same budget" is the same
schedule per training run, which is how nnU-Net compares configurations.

Run from the repository root: `python bench/cascade.py [--epochs 20 --iters 12] [--device cuda]`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_lite.data import make_synthetic_dataset  # noqa: E402
from nnunet_lite.evaluation import evaluate_folder, validate_fold  # noqa: E402
from nnunet_lite.inference import Predictor  # noqa: E402
from nnunet_lite.plans import describe_plans, plan_dataset  # noqa: E402
from nnunet_lite.preprocessing import preprocess_dataset  # noqa: E402
from nnunet_lite.training import Trainer  # noqa: E402


def cpu_flags() -> str:
    "The CPU's name and whether it multiplies bf16 in hardware (lscpu)."
    try: text = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    except OSError: return 'CPU unknown'
    name = next((l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('Model name')), '?')
    bf16 = 'avx512_bf16' in text or 'amx_bf16' in text
    return f"{name}, {'with' if bf16 else 'without'} avx512_bf16/amx"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cases', type=int, default=10)
    p.add_argument('--test', type=int, default=3)
    p.add_argument('--shape', default='48,80,80')
    p.add_argument('--gpu-memory', type=float, default=0.05)
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--iters', type=int, default=12)
    p.add_argument('--fold', type=int, default=0)
    p.add_argument('--device', default=None)
    p.add_argument('--out', type=Path, default=None, help='keep everything here (default: a temporary folder)')
    args = p.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp())
    times, dice = {}, {}
    print(f"machine: {cpu_flags()}; device {args.device or 'default'}; schedule {args.epochs} x {args.iters}")
    try:
        t0 = time.perf_counter()
        raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=args.cases, n_test=args.test, n_classes=2,
                                     shape=tuple(int(s) for s in args.shape.split(',')), progress=False)
        pre = root / 'pre'
        plans = plan_dataset(raw, pre, gpu_memory_gb=args.gpu_memory, progress=False)
        if '3d_cascade_fullres' not in plans['configurations']:
            sys.exit("the plans have no cascade: use larger --shape or smaller --gpu-memory")
        for configuration in ('3d_lowres', '3d_fullres'):
            preprocess_dataset(raw, plans, configuration, pre, progress=False)
        times['data, plans, preprocessing'] = time.perf_counter() - t0
        print(describe_plans(plans)[['spacing', 'median shape', 'patch', 'batch', 'patch covers']].to_string())
        schedule = dict(epochs=args.epochs, iterations=args.iters, val_iterations=3, device=args.device,
                        progress=False)

        def train(configuration, fold):
            t = time.perf_counter()
            trainer = Trainer(pre, configuration, fold, **schedule).fit(resume=True)
            validate_fold(trainer)
            times[f'train + validate {configuration} fold {fold}'] = time.perf_counter() - t

        train('3d_fullres', args.fold)
        for fold in range(5): train('3d_lowres', fold)
        train('3d_cascade_fullres', args.fold)

        first_stage = root / 'predictions' / '3d_lowres'     # the cascade's input: 3d_lowres fold F's predictions
        for name, kwargs in (('3d_fullres', {}), ('3d_lowres', {}),
                             ('3d_cascade_fullres', {'previous_predictions': first_stage})):
            t = time.perf_counter()
            predictor = Predictor(pre / 'results' / name, folds=[args.fold], device=args.device, progress=False,
                                  **kwargs)
            out = root / 'predictions' / name
            predictor.predict_folder(raw / 'imagesTs', out, overwrite=True)
            times[f'predict {args.test} test images with {name}'] = time.perf_counter() - t
            summary = evaluate_folder(out, raw / 'labelsTs', predictor.dataset_json, progress=False)
            dice[name] = {'foreground': summary['foreground_mean']['Dice'],
                          **{f'label {k}': v['Dice'] for k, v in summary['mean'].items()}}
    finally:
        if args.out is None: shutil.rmtree(root, ignore_errors=True)
    print('\nmean Dice on the test images:')
    for name, d in dice.items(): print(f"  {name:20s} " + '  '.join(f"{k} {v:.3f}" for k, v in d.items()))
    print('\nwall time per stage:')
    for name, t in times.items(): print(f"  {name:45s} {t:7.1f} s")


if __name__ == '__main__':
    main()
