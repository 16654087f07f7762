"""Training data pipeline speed: batches per second of patch sampling + full augmentation, nnunet_lite against the
reference nnU-Net v2, on the same preprocessed cases, the same plan and the same number of CPU workers.

What it measures
----------------
1. Writes a synthetic CT-like raw dataset (`nnunet_lite.data.make_synthetic_dataset`), plans it with nnunet_lite
   and sets the 3d_fullres configuration to the reference plan of the issue: patch 96x160x160, batch 2, one
   channel (the network topology, hence the deep-supervision scales, recomputed for that patch). Preprocesses it
   with nnunet_lite, then writes the *same* arrays and foreground locations in the reference's format
   (blosc2 `.b2nd` + pickle, with the chunking the reference's preprocessor uses), so both read identical data.
2. Reference: `nnUNetDataLoader` with the trainer's training transforms (built by `nnUNetTrainer`'s own static
   methods), run by `NonDetMultiThreadedAugmenter` with `-np` worker processes, exactly as `nnUNetTrainer` wraps it
   (each worker loads, crops and augments whole batches, one torch thread each).
   Ours: `nnunet_lite.dataloading.TrainingBatches`: `-np` reading threads and the augmentation as batched torch
   operations in the main process, on `--device` (torch uses as many intra-op threads as there are cores).
3. Each run starts the loader, takes `--warmup` batches (worker start-up, the reference's blur benchmark, caches),
   then times `--batches` batches: batches/s = batches / seconds. Runs alternate ABBA (`--rounds`).
   On a GPU (`--device cuda`) each of our batches is synchronised before the clock is read, and the reference's
   batches are moved to the GPU as its trainer does (pinned memory, non_blocking).

How to read it
--------------
`ratio` = ours / reference batches per second: > 1 means ours delivers batches faster. The reference's loader
is stochastic per worker (its workers draw from fresh OS entropy), ours is seeded; both draw every transform with
the same probabilities and ranges, so the expected amount of work per batch is the same.

Run from the repository root: `python bench/dataloading.py [--device cuda] [-np 2] [--batches 30]`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import abba                         # bench/common.py
from preprocess import set_reference_paths   # bench/preprocess.py: point nnunetv2 at folders under a root

DATASET_NAME = 'Dataset988_BenchLoader'
PATCH = [96, 160, 160]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', type=int, default=6, help='training cases (default 6)')
    p.add_argument('--shape', default='144,224,224', help='shape of one raw case (default 144,224,224)')
    p.add_argument('--patch', default=','.join(map(str, PATCH)), help='patch size (default 96,160,160)')
    p.add_argument('--batch-size', type=int, default=2, help='batch size (default 2)')
    p.add_argument('-np', '--workers', type=int, default=2,
                   help="the reference's augmentation worker processes = our reading threads (default 2)")
    p.add_argument('--device', default='cpu', help="where our augmentation runs: cpu (default) or cuda")
    p.add_argument('--batches', type=int, default=30, help='timed batches per run (default 30)')
    p.add_argument('--warmup', type=int, default=4, help='untimed batches at the start of each run (default 4)')
    p.add_argument('--rounds', type=int, default=1, help='ABBA rounds (reference, ours, ours, reference; default 1)')
    p.add_argument('--out', default=None, help='working folder, kept and reused (default: a temporary folder)')
    return p.parse_args(argv)


def plan_with_patch(plans: dict, patch, batch_size: int) -> dict:
    "The 3d_fullres configuration with the given patch and batch size, its network topology recomputed for the patch."
    from nnunet_lite.plans import architecture, pool_and_conv_props
    cfg = plans['configurations']['3d_fullres']
    _, strides, kernels, padded, _ = pool_and_conv_props(cfg['spacing'], patch)
    features = cfg['architecture']['arch_kwargs']['features_per_stage']
    n_stages = len(strides)
    features = [min(32 * 2 ** i, 320) for i in range(n_stages)] if len(features) != n_stages else features
    cfg.update(patch_size=[int(p) for p in padded], batch_size=int(batch_size),
               architecture=architecture(n_stages, features, kernels, strides, 3))
    for other in [k for k in plans['configurations'] if k != '3d_fullres']: del plans['configurations'][other]
    return plans


def build(args, root: Path):
    "Raw dataset, plans, our preprocessed folder and the reference's copy of it (skipped when already there)."
    from nnunet_lite.data import make_synthetic_dataset, read_dataset_json
    from nnunet_lite.fingerprint import extract_fingerprint
    from nnunet_lite.plans import plan_experiment, save_plans
    from nnunet_lite.preprocessing import preprocess_dataset
    folders = set_reference_paths(root)
    raw, pre = folders['nnUNet_raw'] / DATASET_NAME, folders['nnUNet_preprocessed'] / DATASET_NAME
    done, key = pre / 'ready.json', {k: getattr(args, k) for k in ('cases', 'shape', 'patch', 'batch_size')}
    if done.exists() and json.loads(done.read_text()) == key:   # made by an earlier run with --out
        return pre, json.loads((pre / 'nnUNetPlans.json').read_text())
    shutil.rmtree(raw, ignore_errors=True); shutil.rmtree(pre, ignore_errors=True)
    t0 = time.perf_counter()
    shape = tuple(int(s) for s in args.shape.split(','))
    make_synthetic_dataset(raw, 'ct', n_train=args.cases, n_test=0, shape=shape, workers=2, progress=False)
    dataset_json = read_dataset_json(raw)
    plans = plan_experiment(extract_fingerprint(raw, workers=2, progress=False), dataset_json, dataset_name=DATASET_NAME)
    planned = plans['configurations']['3d_fullres']   # a missing --patch or --batch-size keeps the plan's own
    patch = [int(p) for p in args.patch.split(',')] if args.patch else planned['patch_size']
    plans = plan_with_patch(plans, patch, args.batch_size or planned['batch_size'])
    pre.mkdir(parents=True)
    save_plans(plans, pre / 'nnUNetPlans.json')
    shutil.copy(raw / 'dataset.json', pre / 'dataset.json')
    ours = preprocess_dataset(raw, plans, '3d_fullres', pre / 'nnlite', workers=2, progress=False)
    write_reference_copy(ours, pre / plans['configurations']['3d_fullres']['data_identifier'], plans)
    done.write_text(json.dumps(key))
    print(f"dataset: {args.cases} CT-like cases of ~{args.shape}, planned, preprocessed and copied to the reference's "
          f"format in {time.perf_counter() - t0:.0f} s")
    return pre, plans


def write_reference_copy(ours: Path, theirs: Path, plans: dict):
    "Our preprocessed cases in the reference's format: blosc2 arrays chunked as its preprocessor does, locations (n, 4)."
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunet_lite.preprocessing import load_preprocessed_case, preprocessed_cases
    theirs.mkdir(parents=True, exist_ok=True)
    patch = tuple(plans['configurations']['3d_fullres']['patch_size'])
    for case in preprocessed_cases(ours):
        data, seg, props = load_preprocessed_case(ours, case, mmap=False)
        data, seg = np.ascontiguousarray(data, np.float32), np.ascontiguousarray(seg, np.int8 if seg.max() <= 127 else np.int16)
        locations = {c: np.concatenate([np.zeros((len(v), 1), np.int64), v], 1) if len(v) else []
                     for c, v in props['class_locations'].items()}
        blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, {'class_locations': locations}, str(theirs / case),
                                      chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)


def reference_loader(pre: Path, workers: int, pin_memory: bool):
    "nnUNetDataLoader + training transforms as nnUNetTrainer builds them, in NonDetMultiThreadedAugmenter workers."
    import types
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(pre / 'nnUNetPlans.json'))
    cm = pm.get_configuration('3d_fullres')
    lm = pm.get_label_manager(load_json(str(pre / 'dataset.json')))
    folder = str(pre / cm.data_identifier)
    dataset = infer_dataset_class(folder)(folder)
    trainer_like = types.SimpleNamespace(configuration_manager=cm, print_to_log_file=lambda *a, **k: None)
    rotation, dummy_2d, initial_patch, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer_like)
    ds_scales = [list(s) for s in 1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0)][:-1]
    transforms = nnUNetTrainer.get_training_transforms(
        cm.patch_size, rotation, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
        is_cascaded=False, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    loader = nnUNetDataLoader(dataset, cm.batch_size, initial_patch, cm.patch_size, lm, oversample_foreground_percent=0.33,
                              sampling_probabilities=None, pad_sides=None, transforms=transforms,
                              probabilistic_oversampling=False)
    return NonDetMultiThreadedAugmenter(loader, None, workers, num_cached=max(6, workers // 2), seeds=None,
                                        pin_memory=pin_memory, wait_time=0.002)


def batches_per_second(next_batch, args) -> float:
    "Discard `args.warmup` batches, then time `args.batches` calls of `next_batch`."
    for _ in range(args.warmup): next_batch()
    t0 = time.perf_counter()
    for _ in range(args.batches): next_batch()
    return args.batches / (time.perf_counter() - t0)


def run_reference(pre: Path, args) -> float:
    device = torch.device(args.device)
    augmenter = reference_loader(pre, args.workers, pin_memory=device.type == 'cuda')
    def one():
        batch = next(augmenter)
        if device.type == 'cuda':   # as the reference's trainer: pinned batches moved to the GPU
            batch['data'].to(device, non_blocking=True); [t.to(device, non_blocking=True) for t in batch['target']]
            torch.cuda.synchronize()
    try:
        return batches_per_second(one, args)
    finally:
        augmenter._finish()


def run_ours(pre: Path, plans: dict, args) -> float:
    from nnunet_lite.dataloading import PreprocessedDataset, TrainingBatches, pipeline_settings
    from nnunet_lite.plans import Configuration
    dataset_json = json.loads((pre / 'dataset.json').read_text())
    settings = pipeline_settings(Configuration.from_plans(plans, '3d_fullres'), dataset_json)
    device = torch.device(args.device)
    batches = TrainingBatches(PreprocessedDataset(pre / 'nnlite' / '3d_fullres'), settings, device=device,
                              seed=int(time.time()), threads=args.workers)
    def one():
        next(batches)
        if device.type == 'cuda': torch.cuda.synchronize()
    try:
        return batches_per_second(one, args)
    finally:
        batches.close()


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='nnlite_bench_loader_'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        pre, plans = build(args, root)
        cfg = plans['configurations']['3d_fullres']
        from nnunet_lite.dataloading import augmentation_geometry, source_patch_size
        g = augmentation_geometry(cfg['patch_size'])
        print(f"plan: patch {cfg['patch_size']}, batch {cfg['batch_size']}, source patch "
              f"{source_patch_size(cfg['patch_size'], g['rotation'], g['dummy_2d'])}, strides "
              f"{cfg['architecture']['arch_kwargs']['strides']}; {args.workers} reference workers / our reading threads, "
              f"torch threads {torch.get_num_threads()}, our augmentation on {args.device}")
        results = abba(args.rounds, lambda tool: run_reference(pre, args) if tool == 'reference' else run_ours(pre, plans, args),
                       lambda rate: f"{rate:6.2f} batches/s")
        ref, ours = statistics.mean(results['reference']), statistics.mean(results['nnunet_lite'])
        print(f"\n{'':12s} {'batches/s (mean)':>17s} {'best':>7s}")
        for tool in results:
            print(f"{tool:12s} {statistics.mean(results[tool]):17.2f} {max(results[tool]):7.2f}")
        print(f"ratio (nnunet_lite / reference): {ours / ref:.2f}x")
    finally:
        if not args.out: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
