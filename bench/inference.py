"""Inference speed: predicting a folder of images, whole process (start-up, model loading, reading, preprocessing,
sliding window, resampling back, export), nnunet_lite against the reference nnU-Net v2, with the same trained model,
plan, patch, step and mirroring, in one run.

What it measures
----------------
1. Writes a synthetic CT-like dataset (3 training cases to plan from, `--cases` test images of `--shape`), plans and
   preprocesses it with nnunet_lite and trains fold 'all' for 30 iterations: the weights hardly matter for speed,
   and the model folder nnunet_lite writes is one the reference can load (its checkpoint uses nnU-Net v2's names and
   PlainConvUNet's parameter names), so both tools run the *same* network.
2. Each tool predicts the test images in a fresh Python process, timed from outside (whole process: interpreter,
   imports, model loading, prediction, writing), and reports its own split (start-up + loading / predicting):
   - reference: `nnUNetPredictor(tile_step_size, use_gaussian=True, use_mirroring)`,
     `initialize_from_trained_model_folder(model, ('all',))`, `predict_from_files(..., num_processes_preprocessing=np,
     num_processes_segmentation_export=np)` (its command line cannot run beside the CPU torch: its trainer search
     imports timm/torchvision; the Python API is the same code);
   - ours: `nnlite predict -i IN -o OUT -m MODEL -f all` (the same as `Predictor(...).predict_folder`).
3. Runs alternate ABBA (`--rounds`); at the end the two outputs are compared voxel by voxel.

How to read it
--------------
`ratio` = reference / ours seconds (> 1: ours is faster). Precision: the reference autocasts to float16 on a GPU and
runs float32 on a CPU; ours autocasts to bf16 on a GPU that has it and on a CPU with native bf16 (AVX512-BF16/AMX),
else float32; `--no-amp` makes ours float32 everywhere (then the outputs agree to the last few voxels).

Run from the repository root: `python bench/inference.py [--device cuda] [--cases 4] [--shape 96,160,160]`; the
issue's GPU setting: `python bench/inference.py --device cuda --cases 4 --shape 128,256,256 -np 8`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import abba, precisions   # bench/common.py
from preprocess import set_reference_paths   # bench/preprocess.py: point nnunetv2 at folders under a root


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', type=int, default=4, help='test images to predict (default 4)')
    p.add_argument('--shape', default='64,112,112', help='shape of one image (default 64,112,112)')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('-np', '--workers', type=int, default=2,
                   help="the reference's preprocessing and export processes (default 2)")
    p.add_argument('--step', type=float, default=0.5, help='tile step (default 0.5)')
    p.add_argument('--no-mirroring', action='store_true', help='both without mirroring')
    p.add_argument('--no-amp', action='store_true', help='ours in float32 (as the reference on a CPU)')
    p.add_argument('--rounds', type=int, default=1, help='ABBA rounds (default 1)')
    p.add_argument('--out', default=None, help='working folder, kept (default: a temporary folder)')
    return p.parse_args(argv)


REFERENCE = '''
import json, sys, time
t0 = time.perf_counter()
import torch
import nnunetv2.inference.predict_from_raw_data as predict_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
predict_module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer   # its search imports timm (torchvision)
model, inp, out, device, step, mirror, workers = sys.argv[1:8]
device = torch.device(device)
predictor = predict_module.nnUNetPredictor(tile_step_size=float(step), use_gaussian=True, use_mirroring=mirror == '1',
                                          perform_everything_on_device=device.type == 'cuda', device=device, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model, ('all',), 'checkpoint_final.pth')
t1 = time.perf_counter()
predictor.predict_from_files(inp, out, save_probabilities=False, overwrite=True, num_processes_preprocessing=int(workers),
                             num_processes_segmentation_export=int(workers))
print(json.dumps({'start-up + load': t1 - t0, 'predict': time.perf_counter() - t1}))
'''

OURS = '''
import json, sys, time
t0 = time.perf_counter()
from nnunet_lite.inference import Predictor
model, inp, out, device, step, mirror, amp = sys.argv[1:8]
predictor = Predictor(model, folds=['all'], device=device, step=float(step), mirroring=mirror == '1', amp=amp == '1',
                      progress=False)
t1 = time.perf_counter()
predictor.predict_folder(inp, out, overwrite=True)
print(json.dumps({'start-up + load': t1 - t0, 'predict': time.perf_counter() - t1}))
'''


def build(args, root: Path) -> tuple[Path, Path]:
    "(test image folder, model folder): dataset, plans, preprocessing and a one-iteration model (reused with --out)."
    from nnunet_lite.plans import plan_dataset
    from nnunet_lite.data import make_synthetic_dataset
    from nnunet_lite.preprocessing import preprocess_dataset
    from nnunet_lite.training import Trainer
    shape = tuple(int(s) for s in args.shape.split(','))
    raw, pre = root / 'Dataset986_BenchInference', root / 'preprocessed'
    model = root / 'results' / '3d_fullres'
    key = {'cases': args.cases, 'shape': args.shape}
    done = root / 'ready.json'
    if done.exists() and json.loads(done.read_text()) == key: return raw / 'imagesTs', model
    for d in (raw, pre, root / 'results'): shutil.rmtree(d, ignore_errors=True)
    make_synthetic_dataset(raw, 'ct', n_train=3, n_test=args.cases, shape=shape, spacing_jitter=0.1, progress=False)
    plans = plan_dataset(raw, pre, progress=False)
    preprocess_dataset(raw, plans, '3d_fullres', pre, workers=2, progress=False)
    Trainer(pre, '3d_fullres', 'all', model / 'fold_all', epochs=3, iterations=10, val_iterations=0, device=args.device,
            progress=False).fit()
    cfg = plans['configurations']['3d_fullres']
    print(f"dataset: {args.cases} test images of ~{args.shape}; plan 3d_fullres patch {cfg['patch_size']}, "
          f"spacing {[round(s, 3) for s in cfg['spacing']]}")
    done.write_text(json.dumps(key))
    return raw / 'imagesTs', model


def run(tool: str, args, images: Path, model: Path, out: Path) -> dict:
    "Whole-process seconds of one tool (and its own split), timed around a fresh interpreter."
    shutil.rmtree(out, ignore_errors=True)
    mirror = '0' if args.no_mirroring else '1'
    script, last = (REFERENCE, str(args.workers)) if tool == 'reference' else (OURS, '0' if args.no_amp else '1')
    cmd = [sys.executable, '-c', script, str(model), str(images), str(out), args.device, str(args.step), mirror, last]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0: sys.exit(f"{tool} failed:\n{r.stderr[-3000:]}")
    return {'whole process': wall, **json.loads(r.stdout.strip().splitlines()[-1])}


def agreement(a: Path, b: Path) -> str:
    from nnunet_lite.data import read_label
    files = sorted(a.glob('*.nii.gz'))
    same = [float(np.mean(read_label(f)[0] == read_label(b / f.name)[0])) for f in files]
    geometry = all(read_label(f)[1] == read_label(b / f.name)[1] for f in files)
    return f"{len(files)} cases, voxels equal: min {min(same):.5f}, mean {np.mean(same):.5f}; same geometry: {geometry}"


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='nnlite_bench_inference_'))
    root.mkdir(parents=True, exist_ok=True)
    set_reference_paths(root)
    try:
        images, model = build(args, root)
        reference_precision, ours_precision = precisions(args.device, args.no_amp)
        print(f"device {args.device}; step {args.step}, mirroring {not args.no_mirroring}; reference {reference_precision} "
              f"with {args.workers} preprocessing/export processes, nnunet_lite {ours_precision} with one reading thread")
        results = abba(args.rounds, lambda tool: run(tool, args, images, model, root / f'pred_{tool}'),
                       lambda r: ', '.join(f"{k} {v:6.2f} s" for k, v in r.items()))
        print(f"\n{'':12s} {'whole process':>14s} {'per case':>9s} {'start-up + load':>16s} {'predict':>8s}  (means, s)")
        means = {}
        for tool, rs in results.items():
            means[tool] = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
            m = means[tool]
            print(f"{tool:12s} {m['whole process']:14.2f} {m['predict'] / args.cases:9.2f} {m['start-up + load']:16.2f} {m['predict']:8.2f}")
        ratio = lambda k: means['reference'][k] / means['nnunet_lite'][k]
        print(f"ratio (reference / nnunet_lite): whole process {ratio('whole process'):.2f}x, predicting {ratio('predict'):.2f}x")
        print('agreement:', agreement(root / 'pred_nnunet_lite', root / 'pred_reference'))
    finally:
        if not args.out: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
