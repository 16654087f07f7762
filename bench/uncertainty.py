"""Uncertainty methods compared on failures made on purpose: the snapshot ensemble of a cyclic run, nnU-Net's five
folds, and mirroring test-time augmentation alone, each as a per-case score (`nnunet_lite.uncertainty`). It prints
per method and score the Spearman correlation with Dice, the AUROC of detecting failed cases, the area under the
risk-coverage curve, and the time each method's prediction takes against a plain prediction (one model, mirroring),
plus the training time of a cyclic fold against a poly fold. Not a test: whatever it shows is the figure.

What it does
------------
1. Writes `--cases` training and `--test` test CT cases of `--shape`, plans and preprocesses 3d_fullres.
2. Trains the five folds with `--cycles` cosine cycles in the second half (snapshots at their ends), and fold 0
   once more with plain poly (same schedule) to time the difference.
3. Corrupts the test cases (noise, bias, blur, low resolution at levels 1-3, and a missing organ), predicts them
   with each method and evaluates; a case failed when its Dice is below `--fail` x the clean cases' median Dice.

Run from the repository root: `python bench/uncertainty.py [--epochs 16 --iters 12 --cycles 3]`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from bench.cascade import cpu_flags  # noqa: E402
from nnunet_lite.data import make_synthetic_dataset  # noqa: E402
from nnunet_lite.evaluation import evaluate_folder  # noqa: E402
from nnunet_lite.inference import Predictor  # noqa: E402
from nnunet_lite.plans import plan_dataset  # noqa: E402
from nnunet_lite.preprocessing import preprocess_dataset  # noqa: E402
from nnunet_lite.training import Trainer  # noqa: E402
from nnunet_lite.uncertainty import (UncertaintyPredictor, make_corrupted_set, score_quality,  # noqa: E402
                                     uncertainty_table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--cases', type=int, default=10)
    ap.add_argument('--test', type=int, default=3)
    ap.add_argument('--shape', type=int, nargs=3, default=(24, 40, 40))
    ap.add_argument('--epochs', type=int, default=16)
    ap.add_argument('--iters', type=int, default=12)
    ap.add_argument('--cycles', type=int, default=3)
    ap.add_argument('--fail', type=float, default=0.8)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--keep', type=Path, default=None, help='work here and keep it (default: a temporary folder)')
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix='nnlite_bench_uncertainty_'))
    print(f"machine: {cpu_flags()}; device {args.device}; schedule {args.epochs} x {args.iters}, "
          f"{args.cycles} cycles; {args.cases} training cases of {tuple(args.shape)}")
    raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=args.cases, n_test=args.test, n_classes=2,
                                 shape=tuple(args.shape), progress=False)
    plans = plan_dataset(raw, root / 'pre', progress=False)
    preprocess_dataset(raw, plans, '3d_fullres', root / 'pre', progress=False)
    model = root / 'pre' / 'results' / '3d_fullres'
    schedule = dict(epochs=args.epochs, iterations=args.iters, val_iterations=2, device=args.device, progress=False)

    seconds = {}
    for fold in range(5):
        start = time.perf_counter()
        Trainer(root / 'pre', '3d_fullres', fold, cycles=args.cycles, **schedule).fit()
        seconds[f'train fold {fold} (cyclic)'] = time.perf_counter() - start
    start = time.perf_counter()
    Trainer(root / 'pre', '3d_fullres', 0, output_dir=root / 'poly' / 'fold_0', **schedule).fit()
    seconds['train fold 0 (poly)'] = time.perf_counter() - start

    bad = make_corrupted_set(raw, root / 'corrupted', progress=False)
    n_cases = len(list((bad / 'imagesTs').glob('*_0000.nii.gz')))
    start = time.perf_counter()
    Predictor(model, folds=[0], device=args.device, progress=False).predict_folder(bad / 'imagesTs', root / 'plain')
    seconds['predict plain (fold 0, mirroring)'] = time.perf_counter() - start
    tables, quality = {}, {}
    for method, folds in (('snapshots', [0]), ('folds', None), ('tta', [0]), ('snapshots', None)):
        name = f"{method} ({'fold 0' if folds else 'all folds'})"
        out = root / name.replace(' ', '_').replace('(', '').replace(')', '')
        start = time.perf_counter()
        predictor = UncertaintyPredictor(model, method, folds, device=args.device, progress=False)
        predictor.predict_folder_with_uncertainty(bad / 'imagesTs', out)
        seconds[f'predict {name}, {len(predictor.members["networks"])} members'] = time.perf_counter() - start
        evaluate_folder(out, bad / 'labelsTs', output_file=out / 'summary.json', progress=False)
        tables[name] = table = uncertainty_table(out / 'uncertainty.json', out / 'summary.json')
        clean = table.loc[[c for c in table.index if c.endswith('__clean')], 'Dice'].median()
        quality[name] = score_quality(table, args.fail * clean)
        quality[name]['mean Dice'] = table['Dice'].mean()

    pd.set_option('display.width', 160)
    print(f"\n{n_cases} test cases ({args.test} images: clean, 4 corruptions x 3 levels, missing organ)")
    print(pd.concat(quality).round(3).to_string())
    print("\nmean Dice per corruption (snapshots, fold 0):")
    t = tables['snapshots (fold 0)']
    print(t.groupby('corruption')[['Dice', 'score']].mean().round(3).to_string())
    print("\nseconds:")
    plain = seconds['predict plain (fold 0, mirroring)']
    for k, v in seconds.items():
        ratio = f" ({v / plain:.1f}x the plain prediction)" if k.startswith('predict') else ''
        print(f"  {k}: {v:.1f}{ratio}")
    if args.keep is None: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
