"""Peak memory of predicting one large CT (default 400 × 512 × 512 voxels at 1 × 0.8 × 0.8 mm, 4 outputs) with
`nnlite predict` on the CPU, measured with /usr/bin/time -v, beside the estimate `prediction_memory` makes from the
image's header before reading it.

    python bench/memory.py                          # the large CT (~2 minutes on 2 cores)
    python bench/memory.py --shape 200 256 256      # smaller

The network is planned for the image's size (nnU-Net's patch and stages, 8 GB GPU budget) with few features per
stage and random weights: what it predicts does not matter here, and the memory of sliding-window prediction
is that of the image, the logits and their sums, and the arrays resampled back, not of the network.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_lite.data import Geometry, write_file, write_json
from nnunet_lite.fingerprint import Fingerprint
from nnunet_lite.inference import prediction_memory
from nnunet_lite.network import build_network, reference_state_dict
from nnunet_lite.plans import Configuration
from nnunet_lite.plans import plan_experiment
from nnunet_lite.training import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    flags = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').is_file() else ''
    model = re.search(r'model name\s*:\s*(.+)', flags)
    bf16 = 'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'
    return f"{model.group(1) if model else 'unknown CPU'}, {torch.get_num_threads()} threads, {bf16}"


def large_ct(folder: Path, shape, spacing) -> Path:
    "A CT-like int16 image: air around a body ellipsoid with a denser organ in it."
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    body = (z[:, None, None] ** 2 / 1.2 + y[None, :, None] ** 2 / 0.7 + x[None, None, :] ** 2 / 0.8) < 1
    image = np.where(body, np.int16(40), np.int16(-1000))
    image[shape[0] // 3: shape[0] // 2, shape[1] // 3: shape[1] // 2, shape[2] // 3: shape[2] // 2] = 200
    return write_file(image[None], Geometry(tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                      folder / 'imagesTs' / 'big_0000.nii')


def model_folder(folder: Path, shape, spacing, classes: int) -> tuple[Path, dict]:
    "A model folder with plans for images of `shape` and one fold of random weights (few features per stage)."
    labels = {'background': 0, **{f'class{i}': i for i in range(1, classes + 1)}}
    dataset_json = {'channel_names': {'0': 'CT'}, 'labels': labels, 'numTraining': 10, 'file_ending': '.nii'}
    stats = {'mean': 100.0, 'median': 90.0, 'std': 60.0, 'min': -200.0, 'max': 1200.0, 'percentile_99_5': 400.0,
             'percentile_00_5': -50.0}
    fingerprint = Fingerprint(spacings=[list(spacing)] * 10, shapes_after_crop=[list(shape)] * 10,
                              foreground_intensity_properties_per_channel={'0': stats},
                              median_relative_size_after_cropping=1.0)
    plans = plan_experiment(fingerprint, dataset_json, gpu_memory_gb=8)
    arch = plans['configurations']['3d_fullres']['architecture']['arch_kwargs']
    arch['features_per_stage'] = [min(8, 2 * 2 ** i) for i in range(len(arch['features_per_stage']))]
    net = build_network(Configuration.from_plans(plans, '3d_fullres'), dataset_json, deep_supervision=False)
    model = folder / 'model'
    write_json(model / 'plans.json', plans); write_json(model / 'dataset.json', dataset_json)
    save_checkpoint(model / 'fold_0' / 'checkpoint_final.pth', {
        'network_weights': reference_state_dict(net), 'inference_allowed_mirroring_axes': (0, 1, 2),
        'init_args': {'plans': plans, 'configuration': '3d_fullres', 'fold': 0, 'dataset_json': dataset_json}})
    return model, plans


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shape', type=int, nargs=3, default=[400, 512, 512], help='z y x voxels')
    p.add_argument('--spacing', type=float, nargs=3, default=[1.0, 0.8, 0.8], help='z y x mm')
    p.add_argument('--classes', type=int, default=3, help='foreground classes (outputs = classes + 1)')
    p.add_argument('--mirroring', action='store_true', help='mirror the tiles too (8x the network time)')
    p.add_argument('--out', type=Path, default=None, help='keep the files here')
    args = p.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix='nnlite_memory_'))
    print(f"CPU: {cpu_name()}")
    image = large_ct(folder, args.shape, args.spacing)
    model, plans = model_folder(folder, args.shape, args.spacing, args.classes)
    patch = plans['configurations']['3d_fullres']['patch_size']
    config = Configuration.from_plans(plans, '3d_fullres')
    need = prediction_memory(args.shape, args.spacing, config, 1, args.classes + 1, 'cpu')
    print(f"image {args.shape} at {args.spacing} mm ({image.stat().st_size / 1e9:.2f} GB on disk), "
          f"{args.classes + 1} outputs, patch {patch}")
    command = ['/usr/bin/time', '-v', sys.executable, '-m', 'nnunet_lite.cli', 'predict', '-i', str(folder / 'imagesTs'),
               '-o', str(folder / 'predictions'), '-m', str(model), '--device', 'cpu', '-q', '--overwrite']
    if not args.mirroring: command.append('--no-mirroring')
    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0: sys.exit(f"nnlite predict failed:\n{r.stdout}\n{r.stderr}")
    peak_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', r.stderr).group(1))
    print(f"nnlite predict: {wall:.0f} s, peak RSS {peak_kb / 1e6:.2f} GB; "
          f"estimated beforehand {need['ram'] / 1e9:.2f} GB")


if __name__ == '__main__':
    main()
