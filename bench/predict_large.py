"""Predicting real-size CT images (default one image of 300 x 512 x 512 at 1.5 x 0.8 x 0.8 mm) with an nnU-Net v2
model folder: `nnlite predict` against the reference's `nnUNetv2_predict`, each in a fresh process, timed from
outside, in ABBA order, with the same settings; then the voxel agreement of the two outputs and each tool's peak
memory.

    python bench/predict_large.py --small                # smoke run: one 64 x 160 x 160 image, its plan, 8 features
    python bench/predict_large.py                        # one 300 x 512 x 512 CT (hours on a 2-core CPU: see below)
    python bench/predict_large.py --device cuda --cases 4 --folds 0 1 2 3 4
    python bench/predict_large.py --small --avx2         # both tools on the float32 AVX2 kernels (a laptop's path)
    python bench/predict_large.py --small --stages       # and where the time goes, stage by stage, in each tool
    python bench/predict_large.py --predict-shape 96 256 256 --no-mirroring   # the real network, a smaller image

What it does
------------
1. Plans: a dataset fingerprint of 12 CT-like cases around `--shape` at `--spacing` (z spacings 0.67-2x, in-plane
   0.81-1.18x the given one, same physical extent; foreground CT statistics of soft tissue), written as
   dataset_fingerprint.json, and the reference's own `ExperimentPlanner` (8 GB, the nnUNetPlans default) run on
   it. The target spacing is the median one (default 2.0 x 0.78 x 0.78 mm), so the test images (at `--spacing`)
   are resampled on the way in and on the way back. Our `plan_experiment` is run on the same fingerprint and
   the script says whether its 3d_fullres equals the reference's.
2. Model: nnUNet_results/Dataset777_LargeCT/nnUNetTrainer__nnUNetPlans__3d_fullres with plans.json,
   dataset.json (background + 5 organs) and fold_F/checkpoint_final.pth for each of `--folds`, in the reference
   trainer's checkpoint format (network_weights under PlainConvUNet's names, optimizer_state, init_args
   {plans, configuration, fold, dataset_json}, trainer_name, inference_allowed_mirroring_axes, ...). Weights:
   He-initialised at random (seed `--seed` + fold), then `--train-steps` Adam steps (default 40, lr 3e-3, float32
   on a CPU, gradients clipped at 12, Dice + CE on the full-resolution output, batch 2 crops of twice the network's
   total stride, ~2 s a step for the 32-320-feature network on 2 cores) on a synthetic phantom drawn at the plan's
   spacing. Not a trained model: the steps make the logits depend on the anatomy, so that most voxels have a
   clear winner (seen for the full network: 99 % of the phantom's voxels right, median top-2 logit margin 3.8,
   where random weights give margins of ~0.1) and the agreement of the two tools measures their arithmetic, not
   coin flips between near-tied logits. Scaling the last layer would not do that: bf16 rounding scales with the
   logits. `--train-steps 0` keeps the random weights.
3. Images: `--cases` CT-like images (int16 HU: air, a body ellipse that varies along z, a spine, 5 organ-like
   ellipsoids, Gaussian noise) written as imagesTs/ct_NNN_0000.nii.gz.
4. Runs, ABBA (`--repeats` rounds of reference, ours, ours, reference), each a fresh process:
   - reference: `nnUNetv2_predict -d 777 -c 3d_fullres -f FOLDS -step_size 0.5 -device DEV -npp 1 -nps 1`
     (mirroring on; on a CPU it sets torch's threads to the core count itself; float32 on a CPU, float16
     autocast on CUDA);
   - ours: `nnlite predict -m MODEL -f FOLDS --step 0.5 --device DEV -npp 1 -nps 1` (mirroring on; bf16 autocast
     on a CPU with native bf16 (avx512_bf16/AMX) and on CUDA, else float32; `--no-amp`: float32).
   Both get OMP_NUM_THREADS = MKL_NUM_THREADS = the number of cores (`--threads`), and one preprocessing and one
   export worker (`-npp 1 -nps 1`: on 2 cores more workers only compete with the network for the same cores;
   the reference spawns them as processes, ours runs them as threads). `--avx2` gives both
   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (and ours `--no-amp`): the float32 AVX2 path of most laptops.
5. Measures per run: the whole process's wall time (start-up, imports, model loading, reading, preprocessing,
   sliding window, resampling back, writing), and its memory two ways: the peak of the PSS summed over the
   process tree (psutil, polled every 0.1 s: resident memory with pages shared between processes divided among them, so the reference's
   worker processes count once each, their shared libraries not again; a peak shorter than 0.1 s can be
   missed), and the largest single process's peak RSS (ru_maxrss of os.wait4 on the tool's process: the
   maximum over it and its reaped children).
6. Agreement: the share of voxels whose labels are equal in the two tools' outputs over all cases (and whether
   their geometry is the same).
7. `--stages`: each tool once more, stage by stage in one process (start-up + load, read, preprocess, sliding
   window, export: resample back + argmax, write) on the first case.

The last line is `ratio R (reference / ours), agree A %`: R = the reference's mean seconds / ours (> 1: ours is
faster), A = voxels equal over all cases.

On a CPU the network dominates: the full-size default is 180 tiles x 8 mirrorings of an 80 x 160 x 160 patch, i.e.
1440 forward passes of a 6-stage, 32-320-feature U-Net (1.1 TFLOP each), hours per run on a few cores. `--max-features` caps
the features per stage (not the reference plan then: said in the output) to measure reading, resampling and export
of a real-size image on a small machine; `--no-mirroring` cuts the network time by 8 for both; `--predict-shape`
keeps the plan (made for `--shape`) and predicts smaller images, to time the real network in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import TOOLS_ABBA, precisions   # bench/common.py

DATASET_ID, DATASET = 777, 'Dataset777_LargeCT'
MODEL_SUBDIR = Path('nnUNet_results') / DATASET / 'nnUNetTrainer__nnUNetPlans__3d_fullres'
ORGANS = ('liver', 'spleen', 'kidney_left', 'kidney_right', 'pancreas')
# foreground (organ) CT statistics: what a fingerprint of abdominal organs gives (HU)
LR = 3e-3           # Adam's learning rate of the few training steps
CT_STATS = {'mean': 90.0, 'median': 85.0, 'std': 55.0, 'min': -250.0, 'max': 1400.0, 'percentile_99_5': 260.0,
            'percentile_00_5': -60.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs=3, default=None, metavar=('Z', 'Y', 'X'),
                   help='voxels of each image (default 300 512 512; --small: 64 160 160)')
    p.add_argument('--spacing', type=float, nargs=3, default=[1.5, 0.8, 0.8], metavar=('Z', 'Y', 'X'),
                   help='mm (default 1.5 0.8 0.8); the plan is made for cases around it, its median differs')
    p.add_argument('--small', action='store_true',
                   help='a quick smoke run: 64 x 160 x 160 images, a plan for them, features capped at 8 '
                        '(unless --max-features says otherwise)')
    p.add_argument('--predict-shape', type=int, nargs=3, default=None, metavar=('Z', 'Y', 'X'),
                   help='voxels of the images predicted (default --shape): the plan of a real-size dataset on a '
                        'smaller field of view, to time the real network on a small CPU')
    p.add_argument('--cases', type=int, default=1, help='images to predict (default 1)')
    p.add_argument('--folds', nargs='+', default=['0'], help='folds of the model, all used by both (default 0)')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--no-amp', action='store_true', help='ours in float32 (as the reference on a CPU)')
    p.add_argument('--avx2', action='store_true',
                   help='both tools on the AVX2 float32 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; '
                        'ours --no-amp)')
    p.add_argument('--no-mirroring', action='store_true', help='both without mirroring (8x less network time)')
    p.add_argument('--repeats', type=int, default=1, help='ABBA rounds (default 1: 4 runs)')
    p.add_argument('--once', action='store_true', help='one run of each (reference, then ours) instead of ABBA')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='OMP/MKL threads of both (default: all cores)')
    p.add_argument('--train-steps', type=int, default=40,
                   help='Adam steps on a synthetic phantom after the random init (default 40; 0: random weights)')
    p.add_argument('--max-features', type=int, default=None,
                   help="cap the features per stage (default: the plan's 32-320; --small: 8; 0: no cap); for "
                        "real-size runs on small CPUs")
    p.add_argument('--seed', type=int, default=0, help='weights and images (default 0)')
    p.add_argument('--stages', action='store_true', help='also time each tool stage by stage on the first case')
    p.add_argument('--workdir', type=Path, default=None,
                   help='working folder (kept; model and images reused when the settings match). Default: a '
                        'temporary folder, removed at the end unless --keep')
    p.add_argument('--keep', action='store_true', help='keep the temporary working folder')
    args = p.parse_args(argv)
    if args.shape is None: args.shape = [64, 160, 160] if args.small else [300, 512, 512]
    args.predict_shape = args.predict_shape or args.shape
    if args.max_features is None and args.small: args.max_features = 8
    args.max_features = args.max_features or None
    args.folds = [f if f == 'all' else str(int(f)) for f in args.folds]
    if args.avx2: args.no_amp = True
    return args


# --- the machine -------------------------------------------------------------------------------------------------

def cpu_line() -> str:
    "The CPU's model name, cores, and whether it has avx512_bf16 (lscpu's flags)."
    try: out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError): out = ''
    model = re.search(r'^Model name:\s*(.+)$', out, re.M)
    flags = re.search(r'^Flags:\s*(.+)$', out, re.M)
    flags = flags.group(1).split() if flags else Path('/proc/cpuinfo').read_text().split()
    bf16 = 'avx512_bf16' in flags
    amx = 'amx_bf16' in flags
    return (f"CPU: {model.group(1).strip() if model else 'unknown'}, {os.cpu_count()} cores; lscpu flags "
            f"{'include' if bf16 else 'lack'} avx512_bf16{' and amx_bf16' if amx else ''}")


def load_line() -> str:
    import psutil
    busy = psutil.cpu_percent(interval=1.0)
    return (f"load before starting: {busy:.0f} % of the CPUs busy over 1 s, load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")


# --- plans -------------------------------------------------------------------------------------------------------

def fingerprint_for(shape, spacing) -> dict:
    """12 CT-like cases around `shape` at `spacing` (z, y, x), the same physical extent: z spacings 0.67-2x and
    in-plane spacings 0.81-1.18x the given ones, so the median (the plan's target spacing) differs from it."""
    z_scale = [2 / 3, 5 / 6, 5 / 6, 1, 1, 4 / 3, 4 / 3, 4 / 3, 5 / 3, 5 / 3, 2, 2]
    xy_scale = [0.8125, 0.85, 0.875, 0.9, 0.925, 0.95, 1.0, 1.025, 1.05, 1.075, 1.125, 1.175]
    spacings, shapes = [], []
    for i, (zs, ps) in enumerate(zip(z_scale, xy_scale)):
        sp = [round(spacing[0] * zs, 4), round(spacing[1] * ps, 4), round(spacing[2] * ps, 4)]
        spacings.append(sp)
        shapes.append([int(round(shape[0] * spacing[0] / sp[0])), int(shape[1]), int(shape[2])])
    return {'spacings': spacings, 'shapes_after_crop': shapes,
            'foreground_intensity_properties_per_channel': {'0': dict(CT_STATS)},
            'median_relative_size_after_cropping': 1.0}


def dataset_json_for() -> dict:
    return {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, **{o: i + 1 for i, o in enumerate(ORGANS)}},
            'numTraining': 12, 'file_ending': '.nii.gz', 'name': DATASET,
            'description': 'bench/predict_large.py: synthetic CT, random-ish weights'}


def reference_plans(root: Path, fingerprint: dict, dataset_json: dict) -> dict:
    """The reference's ExperimentPlanner (8 GB) on `fingerprint`: the plans it writes to nnUNet_preprocessed. It
    opens one training image only to choose the reader: a tiny dummy."""
    import SimpleITK as sitk
    raw, pre = root / 'nnUNet_raw' / DATASET, root / 'nnUNet_preprocessed' / DATASET
    (raw / 'imagesTr').mkdir(parents=True, exist_ok=True); (raw / 'labelsTr').mkdir(exist_ok=True)
    pre.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 5, 6), np.float32)), str(raw / 'imagesTr' / 'dummy_0000.nii.gz'))
    (raw / 'dataset.json').write_text(json.dumps(dataset_json, indent=2))
    (pre / 'dataset_fingerprint.json').write_text(json.dumps(fingerprint, indent=2))
    import contextlib, io
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    with contextlib.redirect_stdout(io.StringIO()):
        planner = ExperimentPlanner(DATASET, gpu_memory_target_in_gb=8)
        planner.plan_experiment()
    return json.loads((pre / f'{planner.plans_identifier}.json').read_text())


def same_fullres(ours: dict, theirs: dict) -> str:
    keys = ('spacing', 'patch_size', 'batch_size', 'median_image_size_in_voxels', 'architecture', 'normalization_schemes',
            'resampling_fn_data_kwargs', 'resampling_fn_probabilities_kwargs')
    a, b = ours['configurations']['3d_fullres'], theirs['configurations']['3d_fullres']
    norm = lambda v: json.loads(json.dumps(v))
    differ = [k for k in keys if norm(a.get(k)) != norm(b.get(k))]
    return 'equal to the reference' if not differ else f"differs from the reference in {differ}"


# --- images ------------------------------------------------------------------------------------------------------

def _ellipsoid(out: np.ndarray, spacing, centre_mm, axes_mm, value, label=None, label_value=0):
    "Paint `value` into `out` (and `label_value` into `label`) inside an ellipsoid given in mm from the centre."
    shape = np.asarray(out.shape)
    c = np.asarray(centre_mm) / np.asarray(spacing) + (shape - 1) / 2
    r = np.asarray(axes_mm) / np.asarray(spacing)
    lo = np.maximum(np.floor(c - r).astype(int), 0); hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
    if np.any(hi <= lo): return
    g = [((np.arange(lo[i], hi[i], dtype=np.float32) - c[i]) / r[i]) ** 2 for i in range(3)]
    inside = (g[0][:, None, None] + g[1][None, :, None] + g[2][None, None, :]) <= 1
    box = tuple(slice(lo[i], hi[i]) for i in range(3))
    out[box][inside] = value
    if label is not None: label[box][inside] = label_value


def phantom(shape, spacing, seed: int, noise: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like image (int16 HU) and its labels (uint8, background + 5 organs) of `shape` voxels at `spacing` mm:
    air, a body ellipse whose size varies along z, a spine, 5 organ-like ellipsoids, Gaussian noise."""
    rng = np.random.default_rng(seed)
    shape, spacing = np.asarray(shape), np.asarray(spacing, float)
    ext = shape * spacing                                      # mm
    img = np.full(tuple(shape), -1000.0, np.float32)
    lab = np.zeros(tuple(shape), np.uint8)
    zmm = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    ymm = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
    xmm = (np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing[2]
    wobble = 1 + 0.06 * np.sin(2 * np.pi * zmm / max(ext[0], 1) + rng.uniform(0, 6.28))
    ay, ax = 0.36 * ext[1], 0.44 * ext[2]
    for k in range(shape[0]):                                  # body: an ellipse per slice, fat + muscle HU
        inside = (ymm[:, None] / (ay * wobble[k])) ** 2 + (xmm[None, :] / (ax * wobble[k])) ** 2 <= 1
        img[k][inside] = 20.0
    s = lambda lo, hi, n=3: rng.uniform(lo, hi, n)
    _ellipsoid(img, spacing, [0, 0.24 * ext[1], 0], [ext[0], 0.05 * ext[1], 0.05 * ext[2]], 700.0)   # spine
    organs = [   # (centre, semi-axes) as fractions of the extent (z, y, x); HU
        ([0.08, -0.02, -0.16], [0.20, 0.20, 0.16], 60.0),     # liver
        ([0.12, 0.05, 0.22], [0.08, 0.09, 0.06], 50.0),       # spleen
        ([-0.06, 0.14, -0.13], [0.07, 0.05, 0.04], 160.0),    # kidneys
        ([-0.06, 0.14, 0.13], [0.07, 0.05, 0.04], 160.0),
        ([0.00, 0.02, 0.04], [0.03, 0.03, 0.10], 100.0)]      # pancreas
    for i, (centre, axes, hu) in enumerate(organs):
        centre = (np.asarray(centre) + s(-0.02, 0.02)) * ext
        axes = np.asarray(axes) * s(0.9, 1.1) * ext
        _ellipsoid(img, spacing, centre, axes, hu + rng.uniform(-5, 5), lab, i + 1)
    for k in range(0, shape[0], 64):                           # noise, in slabs (memory)
        sl = img[k:k + 64]
        sl += rng.standard_normal(sl.shape, dtype=np.float32) * noise
    return np.clip(np.round(img), -1024, 3071).astype(np.int16), lab


def write_images(folder: Path, n: int, shape, spacing, seed: int) -> list[Path]:
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        img, _ = phantom(shape, spacing, seed * 1000 + 100 + i)
        im = sitk.GetImageFromArray(img)
        im.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        im.SetOrigin((-200.0 + 3 * i, -180.0, -300.0))
        f = folder / f'ct_{i:03d}_0000.nii.gz'
        sitk.WriteImage(im, str(f), True)
        files.append(f)
    return files


# --- the model ---------------------------------------------------------------------------------------------------

def train_steps(net, config, steps: int, seed: int, device: str) -> tuple[float, float, dict]:
    """`steps` Adam steps (lr 1e-3, Dice + CE) on crops of a phantom drawn at the plan's spacing, normalised as
    the preprocessing does. Returns (first loss, last loss, the optimizer's state dict)."""
    import torch
    from nnunet_lite.preprocessing import ct_normalize
    from nnunet_lite.training import amp_dtype, autocast, dice_ce_loss
    strides = np.prod(np.asarray(config.architecture['arch_kwargs']['strides']), axis=0)
    crop = np.minimum(2 * strides, np.asarray(config.patch_size))
    spacing = np.asarray(config.spacing)
    shape = np.maximum(np.round(np.asarray(config.plan['median_image_size_in_voxels']) * 0.6).astype(int), crop)
    # the phantom's physical extent: that of a (smaller) median case, so organs fill a good part of each crop
    img, lab = phantom(shape, spacing, seed)
    x = ct_normalize(img.astype(np.float32), CT_STATS)
    dev = torch.device(device)
    net.to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    rng = np.random.default_rng(seed)
    dtype = amp_dtype(dev) if dev.type == 'cuda' else None   # float32 on a CPU: bf16 steps diverged at times
    first = last = float('nan')
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            fg = np.argwhere(lab[::4, ::4, ::4] > 0) * 4 if rng.random() < 0.67 else None
            centre = fg[rng.integers(len(fg))] if fg is not None and len(fg) else rng.integers(0, shape)
            lo = np.clip(centre - crop // 2, 0, shape - crop)
            box = tuple(slice(a, a + c) for a, c in zip(lo, crop))
            xs.append(x[box][None]); ys.append(lab[box][None])
        xb = torch.from_numpy(np.stack(xs)).to(dev); yb = torch.from_numpy(np.stack(ys).astype(np.int64)).to(dev)
        with autocast(dev, dtype):
            out = net(xb)
        loss = dice_ce_loss(out.float(), yb)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)     # as nnU-Net's trainer
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    net.eval().cpu()
    return first, last, opt.state_dict()


def build_model(args, root: Path, plans: dict, dataset_json: dict) -> Path:
    "The model folder in the reference's layout, one checkpoint per fold in its trainer's format."
    import torch
    from nnunet_lite.network import build_network, count_parameters, reference_state_dict
    from nnunet_lite.plans import Configuration
    from nnunet_lite.training import save_checkpoint
    model = root / MODEL_SUBDIR
    model.mkdir(parents=True, exist_ok=True)
    (model / 'plans.json').write_text(json.dumps(plans, indent=2))
    (model / 'dataset.json').write_text(json.dumps(dataset_json, indent=2))
    config = Configuration.from_plans(plans, '3d_fullres', dataset_json)
    for fold in args.folds:
        seed = args.seed + (0 if fold == 'all' else int(fold))
        torch.manual_seed(seed)
        net = build_network(config, dataset_json, deep_supervision=False)
        t0 = time.perf_counter()
        first, last, opt_state = (train_steps(net, config, args.train_steps, seed, args.device) if args.train_steps
                                  else (float('nan'), float('nan'), None))
        weights = 'random (He init, seed %d)' % seed + (
            f" + {args.train_steps} Adam steps on a synthetic phantom (loss {first:.3f} -> {last:.3f}, "
            f"{time.perf_counter() - t0:.0f} s)" if args.train_steps else '')
        print(f"  fold {fold}: {count_parameters(net) / 1e6:.2f} M parameters, weights {weights}", flush=True)
        save_checkpoint(model / f'fold_{fold}' / 'checkpoint_final.pth', {
            'network_weights': reference_state_dict(net),
            'optimizer_state': opt_state,
            'grad_scaler_state': None,
            'logging': {},
            '_best_ema': None,
            'current_epoch': 1,
            'init_args': {'plans': plans, 'configuration': '3d_fullres', 'fold': 'all' if fold == 'all' else int(fold),
                          'dataset_json': dataset_json},
            'trainer_name': 'nnUNetTrainer',
            'inference_allowed_mirroring_axes': (0, 1, 2),
        })
    return model


def build(args, root: Path) -> tuple[Path, Path, dict]:
    "(image folder, model folder, plans), reused from `root` when made with the same settings."
    key = {k: getattr(args, k) for k in ('shape', 'predict_shape', 'spacing', 'cases', 'folds', 'train_steps', 'max_features', 'seed')}
    key['device'] = args.device.split(':')[0]
    done = root / 'ready.json'
    model, images = root / MODEL_SUBDIR, root / 'imagesTs'
    if done.exists() and json.loads(done.read_text()) == key:
        print(f"reusing the model and images in {root}")
        return images, model, json.loads((model / 'plans.json').read_text())
    done.unlink(missing_ok=True)
    for d in (root / 'nnUNet_raw', root / 'nnUNet_preprocessed', root / 'nnUNet_results', images):
        shutil.rmtree(d, ignore_errors=True)
    from nnunet_lite.plans import plan_experiment
    fingerprint, dataset_json = fingerprint_for(args.shape, args.spacing), dataset_json_for()
    t0 = time.perf_counter()
    plans = reference_plans(root, fingerprint, dataset_json)
    ours = plan_experiment(fingerprint, dataset_json, gpu_memory_gb=8)
    cfg = plans['configurations']['3d_fullres']
    arch = cfg['architecture']['arch_kwargs']
    print(f"plans: the reference's ExperimentPlanner (8 GB) on a fingerprint of 12 cases around {args.shape} at "
          f"{args.spacing} mm ({time.perf_counter() - t0:.0f} s); ours {same_fullres(ours, plans)}")
    print(f"  3d_fullres: spacing {[round(s, 3) for s in cfg['spacing']]} mm, median image "
          f"{[round(s) for s in cfg['median_image_size_in_voxels']]}, patch {cfg['patch_size']}, "
          f"{arch['n_stages']} stages, features {arch['features_per_stage']}, {len(dataset_json['labels'])} outputs")
    if args.max_features:
        arch['features_per_stage'] = [min(f, args.max_features) for f in arch['features_per_stage']]
        print(f"  --max-features {args.max_features}: features {arch['features_per_stage']} (NOT the reference's plan)")
    build_model(args, root, plans, dataset_json)
    t0 = time.perf_counter()
    files = write_images(images, args.cases, args.predict_shape, args.spacing, args.seed)
    print(f"images: {args.cases} x {args.predict_shape} at {args.spacing} mm (int16, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.0f} MB gzipped; {time.perf_counter() - t0:.0f} s to make)")
    done.write_text(json.dumps(key))
    return images, model, plans


# --- the runs ----------------------------------------------------------------------------------------------------

def tool_command(tool: str, args, images: Path, model: Path, out: Path) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if tool == 'reference':
        cmd = [str(bin_dir / 'nnUNetv2_predict'), '-i', str(images), '-o', str(out), '-d', str(DATASET_ID),
               '-c', '3d_fullres', '-f', *args.folds, '-step_size', '0.5', '-device', args.device.split(':')[0],
               '-npp', '1', '-nps', '1', '--disable_progress_bar']
        return cmd + (['--disable_tta'] if args.no_mirroring else [])
    cmd = [str(bin_dir / 'nnlite'), 'predict', '-i', str(images), '-o', str(out), '-m', str(model), '-f', *args.folds,
           '--step', '0.5', '--device', args.device, '-npp', '1', '-nps', '1', '-q']
    return cmd + (['--no-amp'] if args.no_amp else []) + (['--no-mirroring'] if args.no_mirroring else [])


def tool_env(args, root: Path) -> dict:
    env = dict(os.environ)
    n = str(args.threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, nnUNet_raw=str(root / 'nnUNet_raw'),
               nnUNet_preprocessed=str(root / 'nnUNet_preprocessed'), nnUNet_results=str(root / 'nnUNet_results'))
    if args.avx2: env.update(ATEN_CPU_CAPABILITY='avx2', ONEDNN_MAX_CPU_ISA='AVX2')
    return env


def tree_pss(pid: int) -> int:
    """PSS (resident memory, pages shared between processes divided among them) summed over a process and its
    descendants, in bytes (0 once it is gone)."""
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try: total += q.memory_full_info().pss
        except psutil.Error: pass
    return total


def run_process(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` to the end: wall seconds, the peak of the PSS summed over its process tree (polled) and the largest
    single process's peak RSS (ru_maxrss of wait4), in GB."""
    with open(log, 'w') as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        peak, stop = [0], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], tree_pss(proc.pid))
                stop.wait(0.1)
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set(); watcher.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    return {'seconds': wall, 'tree_gb': peak[0] / 1e9, 'process_gb': usage.ru_maxrss * 1024 / 1e9}


def agreement(ours: Path, ref: Path) -> tuple[float, str]:
    import SimpleITK as sitk
    equal = total = 0
    same_geometry, counts = True, []
    for f in sorted(ours.glob('*.nii.gz')):
        a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(ref / f.name))
        same_geometry &= (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
                          and np.allclose(a.GetOrigin(), b.GetOrigin())
                          and np.allclose(a.GetDirection(), b.GetDirection()))
        x, y = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
        equal += int(np.count_nonzero(x == y)); total += x.size
        counts.append((np.bincount(x.ravel(), minlength=6)[:6] / x.size, np.bincount(y.ravel(), minlength=6)[:6] / y.size))
    if total == 0: sys.exit(f"no predictions in {ours}")
    share = lambda c: '/'.join(f'{100 * v:.1f}' for v in c)
    text = (f"{len(counts)} case(s), {total / 1e6:.1f} M voxels; same geometry: {same_geometry}; labels 0-5 "
            f"(% of voxels, first case) ours {share(counts[0][0])}, reference {share(counts[0][1])}")
    return 100 * equal / total, text


# --- where the time goes -----------------------------------------------------------------------------------------

OURS_STAGES = r'''
import json, sys, time
t = {}; t0 = time.perf_counter()
import torch
from nnunet_lite.inference import Predictor
from nnunet_lite.preprocessing import read_case
model, image, out, device, amp, mirror = sys.argv[1:7]
folds = [f if f == 'all' else int(f) for f in sys.argv[7:]]
sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
p = Predictor(model, folds=folds, device=device, step=0.5, mirroring=mirror == '1', amp=amp == '1', progress=False)
def lap(name):
    global t0
    sync(); now = time.perf_counter(); t[name] = now - t0; t0 = now
lap('start-up + load')
image_arr, _, geometry = read_case([image]); lap('read')
data, props = p.preprocess(image_arr, geometry); lap('preprocess')
logits = p.predict_preprocessed(data); lap('sliding window')
result = p.export(logits, props); lap('export (resample back, argmax)')
p.write(result, geometry, out); lap('write')
print(json.dumps(t))
'''

REFERENCE_STAGES = r'''
import json, sys, time
t = {}; t0 = time.perf_counter()
import multiprocessing, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
model, image, out, device, amp, mirror = sys.argv[1:7]
folds = [f if f == 'all' else int(f) for f in sys.argv[7:]]
if device == 'cpu': torch.set_num_threads(multiprocessing.cpu_count())   # as nnUNetv2_predict does
sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror == '1', perform_everything_on_device=True,
                    device=torch.device(device), allow_tqdm=False)
p.initialize_from_trained_model_folder(model, folds, 'checkpoint_final.pth')
def lap(name):
    global t0
    sync(); now = time.perf_counter(); t[name] = now - t0; t0 = now
lap('start-up + load')
rw = p.plans_manager.image_reader_writer_class()
data, props = rw.read_images([image]); lap('read')
pre = p.configuration_manager.preprocessor_class(verbose=False)
data, _, props = pre.run_case_npy(data, None, props, p.plans_manager, p.configuration_manager, p.dataset_json)
data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format); lap('preprocess')
logits = p.predict_logits_from_preprocessed_data(data).cpu().numpy(); lap('sliding window')
seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, p.plans_manager, p.configuration_manager,
                                                                  p.label_manager, props, False)
lap('export (resample back, argmax)')
rw.write_seg(seg, out, props); lap('write')
print(json.dumps(t))
'''


def stages(args, images: Path, model: Path, root: Path, env: dict):
    "Each tool stage by stage on the first case, one process each (the work of one case, without the pipelining)."
    image = sorted(images.glob('*_0000.nii.gz'))[0]
    (root / 'stages').mkdir(exist_ok=True)
    rows = {}
    for tool, script in (('reference', REFERENCE_STAGES), ('nnunet_lite', OURS_STAGES)):
        out = root / 'stages' / f'{tool}.nii.gz'
        cmd = [sys.executable, '-c', script, str(model), str(image), str(out), args.device,
               '0' if args.no_amp else '1', '0' if args.no_mirroring else '1', *args.folds]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0: sys.exit(f"{tool} stages failed:\n{r.stderr[-3000:]}")
        rows[tool] = json.loads(r.stdout.strip().splitlines()[-1])
    names = list(rows['reference'])
    print("\nstage by stage, first case, one process per tool (s):")
    print(f"  {'':32s} {'reference':>10s} {'nnunet_lite':>12s}")
    for n in names:
        print(f"  {n:32s} {rows['reference'][n]:10.1f} {rows['nnunet_lite'][n]:12.1f}")
    print(f"  {'total':32s} {sum(rows['reference'].values()):10.1f} {sum(rows['nnunet_lite'].values()):12.1f}")


# --- main --------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix='nnlite_predict_large_'))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):   # the reference reads them lazily
        (root / var).mkdir(exist_ok=True)
        os.environ[var] = str(root / var)
    print(cpu_line())
    print(load_line(), flush=True)
    try:
        images, model, plans = build(args, root)
        env = tool_env(args, root)
        ref_p, our_p = precisions(args.device, args.no_amp)
        if args.avx2: ref_p = our_p = 'float32, AVX2 kernels'
        print(f"device {args.device}; folds {' '.join(args.folds)}; step 0.5; mirroring {not args.no_mirroring}; "
              f"{args.threads} threads each (OMP/MKL_NUM_THREADS); -npp 1 -nps 1 each; reference {ref_p}, "
              f"nnunet_lite {our_p}{'; ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2' if args.avx2 else ''}")
        print("memory: peak of the PSS summed over the process tree (psutil, every 0.1 s) / peak RSS of the largest "
              "single process (ru_maxrss of wait4)", flush=True)
        order = ('reference', 'nnunet_lite') if args.once else TOOLS_ABBA * args.repeats
        (root / 'logs').mkdir(exist_ok=True)
        results = {'reference': [], 'nnunet_lite': []}
        for i, tool in enumerate(order):
            out = root / f'pred_{tool}'
            shutil.rmtree(out, ignore_errors=True)
            r = run_process(tool_command(tool, args, images, model, out), env, root / 'logs' / f'{i}_{tool}.log')
            results[tool].append(r)
            print(f"  {tool:12s} {r['seconds']:8.1f} s ({r['seconds'] / args.cases:.1f} s per case), peak RSS "
                  f"{r['tree_gb']:.2f} GB tree PSS / {r['process_gb']:.2f} GB largest process RSS", flush=True)
        print(f"\n{'':12s} {'mean s':>8s} {'best s':>8s} {'s/case':>8s} {'tree PSS':>11s} {'largest RSS':>12s}")
        mean = {}
        for tool, rs in results.items():
            mean[tool] = statistics.mean(r['seconds'] for r in rs)
            print(f"{tool:12s} {mean[tool]:8.1f} {min(r['seconds'] for r in rs):8.1f} {mean[tool] / args.cases:8.1f} "
                  f"{max(r['tree_gb'] for r in rs):8.2f} GB {max(r['process_gb'] for r in rs):9.2f} GB")
        agree, text = agreement(root / 'pred_nnunet_lite', root / 'pred_reference')
        print(f"agreement: {text}")
        if args.stages: stages(args, images, model, root, env)
        if args.workdir is None and args.keep: print(f"kept {root}")
        ratio = mean['reference'] / mean['nnunet_lite']
        weights = 'random weights' + (f' + {args.train_steps} Adam steps' if args.train_steps else '')
        print(f"\n(model: the reference's 3d_fullres plan{', features capped' if args.max_features else ''}, {weights}; "
              f"the time is whole processes, means over {len(results['reference'])} run(s) each)")
        print(f"ratio {ratio:.2f} (reference / ours), agree {agree:.3f} %")
    finally:
        if args.workdir is None and not args.keep: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
