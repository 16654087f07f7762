"""Training speed: seconds per training iteration (batch loading + augmentation + forward + backward + SGD step)
of nnunet_lite's `Trainer` against the reference `nnUNetTrainer`, on the same preprocessed cases, the same plan and
the same machine, in one run.

What it measures
----------------
1. Writes a synthetic CT-like dataset of small cases (default 8 cases of 36x50x35 voxels) and plans it; the
   3d_fullres configuration is the reference's plan for it (patch 40x56x40, batch 2 by default; `--patch` and
   `--batch-size` change it). Preprocesses it with nnunet_lite and writes the same arrays in the reference's format
   (`bench/dataloading.py`'s `build`), so both train on identical data.
2. Reference: `nnUNetTrainer(plans, '3d_fullres', 0, dataset_json, device)` driven from Python (its command line
   needs a torchvision that matches the CPU torch): `on_train_start()` (network, optimiser, its data loader with
   `-np` augmentation worker processes), `on_train_epoch_start()`, then `train_step(next(dataloader_train))`.
   Ours: `Trainer(preprocessed, '3d_fullres', 0)`, its `batch_streams()` (`-np` reading threads, the augmentation
   in torch on the training device) and `train_step(next(batches))`.
   Mixed precision: the reference autocasts to float16 on a GPU and trains in float32 on a CPU; ours autocasts to
   bf16 on a GPU that has it and on a CPU with native bf16 instructions (AVX512-BF16/AMX), else float32.
   `--no-amp` makes ours float32 too, to compare the rest of the step alone.
3. Each run does `--warmup` untimed iterations, then times `--iterations` iterations: seconds / iteration.
   Runs alternate ABBA (`--rounds`). On a GPU (`--device cuda`) every iteration is synchronised.

How to read it
--------------
`ratio` = reference / ours seconds per iteration: > 1 means ours trains faster. Both use the same network (same
parameter count, checked in tests/test_reference_network.py), the same loss, optimiser and augmentation
probabilities; the work per iteration differs only in how batches are made and how the step is run.

`--fixed-batch` adds the step alone, on one batch reused (no loading, no augmentation: the reference's "GPU alone"
figure); `--epoch` adds one whole epoch (250 training + 50 validation iterations by default).

How close to the machine's limit: the FLOPs of one step are counted from the network's convolutions (forward and
backward, torch's FlopCounterMode) and divided by each tool's seconds per iteration, then by the peak of the CPU
(cores x clock x FLOPs per cycle of its widest float32 or bf16 unit: `common.cpu_peak_gflops`) or of the GPU (data
sheet, `common.GPU_PEAK_TFLOPS`) for the precision each tool runs in. The peak is an estimate (turbo clocks, units per
core); the fraction says how much of the step is convolution arithmetic at full speed.

Run from the repository root: `python bench/training.py [--device cuda] [-np 2] [--iterations 20]`; on a GPU for the
issue's epoch target: `python bench/training.py --device cuda -np 16 --cases 20 --shape 128,256,256
--patch 128,128,128 --batch-size 2 --epoch --fixed-batch` (the plan's patch for that dataset is what the planner gives;
set `--patch`/`--batch-size` to it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import abba, flops_line, machine_peak_gflops, precisions, step_flops   # bench/common.py
from dataloading import build   # bench/dataloading.py: dataset, plans, our preprocessed folder and the reference's copy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', type=int, default=8, help='training cases (default 8)')
    p.add_argument('--shape', default='36,50,35', help='shape of one raw case (default 36,50,35)')
    p.add_argument('--patch', default='40,56,40', help='patch size (default 40,56,40, the reference plan for 36x50x35)')
    p.add_argument('--batch-size', type=int, default=2, help='batch size (default 2)')
    p.add_argument('-np', '--workers', type=int, default=2,
                   help="the reference's augmentation worker processes = our reading threads (default 2)")
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--iterations', type=int, default=20, help='timed iterations per run (default 20)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations at the start of each run (default 3)')
    p.add_argument('--rounds', type=int, default=1, help='ABBA rounds (reference, ours, ours, reference; default 1)')
    p.add_argument('--fixed-batch', action='store_true',
                   help='also time steps on one fixed batch: the network step alone, without data loading/augmentation')
    p.add_argument('--epoch', action='store_true',
                   help='also time one whole epoch of --epoch-iterations training and --epoch-val-iterations validation steps')
    p.add_argument('--epoch-iterations', type=int, default=250, help='training iterations of --epoch (default 250)')
    p.add_argument('--epoch-val-iterations', type=int, default=50, help='validation iterations of --epoch (default 50)')
    p.add_argument('--no-amp', action='store_true', help='train ours in float32 (as the reference on a CPU)')
    p.add_argument('--out', default=None, help='working folder, kept and reused (default: a temporary folder)')
    return p.parse_args(argv)


def timed(fn, n: int, warmup: int, device: torch.device) -> float:
    "Seconds per call of `fn` over `n` calls, after `warmup` untimed ones (synchronised on a GPU)."
    for _ in range(warmup): fn()
    if device.type == 'cuda': torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    if device.type == 'cuda': torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(n, 1)


def measure(train_step, next_train, val_step, next_val, args, device) -> dict:
    "s/iteration with fresh batches; optionally on one fixed batch (the step alone) and a whole epoch."
    out = {'s/iteration': timed(lambda: train_step(next_train()), args.iterations, args.warmup, device)}
    if args.fixed_batch:
        batch = next_train()
        out['s/iteration, fixed batch'] = timed(lambda: train_step(batch), args.iterations, 1, device)
    if args.epoch:
        def epoch():
            for _ in range(args.epoch_iterations): train_step(next_train())
            for _ in range(args.epoch_val_iterations): val_step(next_val())
        out['s/epoch'] = timed(epoch, 1, 0, device)
    return out


def run_reference(pre: Path, plans: dict, args, results: Path) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    device = torch.device(args.device)
    os.environ['nnUNet_n_proc_DA'] = str(args.workers)
    dataset_json = json.loads((pre / 'dataset.json').read_text())
    trainer = nnUNetTrainer({**plans, 'continue_training': False}, '3d_fullres', 0, dataset_json, device=device)   # as run_training does
    trainer.print_to_log_file = lambda *a, **k: None
    trainer.plot_network_architecture = lambda: None
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    def val_step(batch):
        trainer.network.eval(); trainer.validation_step(batch); trainer.network.train()
    try:
        return measure(trainer.train_step, lambda: next(trainer.dataloader_train), val_step,
                       lambda: next(trainer.dataloader_val), args, device)
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, '_finish'): loader._finish()


def run_ours(pre: Path, args, results: Path) -> dict:
    from nnunet_lite.training import Trainer
    device = torch.device(args.device)
    trainer = Trainer(pre / 'nnlite', '3d_fullres', 0, output_dir=results / 'nnlite', device=args.device,
                      threads=args.workers, seed=int(time.time()), amp=not args.no_amp, progress=False)
    trainer.network.train()
    train, val = trainer.batch_streams()
    def val_step(batch):
        trainer.network.eval(); trainer.validation_step(batch); trainer.network.train()
    try:
        return measure(trainer.train_step, lambda: next(train), val_step, lambda: next(val), args, device)
    finally:
        train.close(); val.close()


def network_step_flops(plans: dict, pre: Path, device: str) -> float:
    "FLOPs of one training step of the 3d_fullres network with the plan's patch and batch (the same in both tools)."
    from nnunet_lite.network import build_network
    dataset_json = json.loads((pre / 'dataset.json').read_text())
    from nnunet_lite.plans import Configuration
    config = Configuration.from_plans(plans, '3d_fullres', dataset_json)
    network = build_network(config, dataset_json).to(device)
    return step_flops(network, config.input_channels, config.patch_size, config.batch_size, device)


def build_for_trainers(args, root: Path) -> tuple[Path, dict]:
    """`build`'s data, plus what each trainer reads beside it: our complete preprocessed folder (plans.json,
    dataset.json, 3d_fullres/) and a fingerprint file for the reference's trainer, which copies it to its results."""
    pre, plans = build(args, root)
    ours = pre / 'nnlite'
    (ours / 'plans.json').write_text(json.dumps(plans))
    shutil.copy(pre / 'dataset.json', ours / 'dataset.json')
    if not (pre / 'dataset_fingerprint.json').exists():
        (pre / 'dataset_fingerprint.json').write_text('{}')
    return pre, plans


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='nnlite_bench_training_'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        pre, plans = build_for_trainers(args, root)
        cfg = plans['configurations']['3d_fullres']
        reference_precision, ours_precision = precisions(args.device, args.no_amp)
        print(f"precision: reference {reference_precision}, nnunet_lite {ours_precision}")
        print(f"plan: patch {cfg['patch_size']}, batch {cfg['batch_size']}, features "
              f"{cfg['architecture']['arch_kwargs']['features_per_stage']}; device {args.device}, {args.workers} reference "
              f"workers / our reading threads, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
        flops = network_step_flops(plans, pre, args.device)
        print(f"one training step: {flops / 1e9:.1f} GFLOP in the network's convolutions (forward and backward, "
              f"FlopCounterMode; the same network in both tools)")
        measure = lambda tool: (run_reference(pre, plans, args, root / 'results' / tool) if tool == 'reference'
                                else run_ours(pre, args, root / 'results' / tool))
        results = abba(args.rounds, measure, lambda r: ', '.join(f"{v:7.3f} {k}" for k, v in r.items()))
        for key in results['reference'][0]:
            ref = [r[key] for r in results['reference']]; ours_t = [r[key] for r in results['nnunet_lite']]
            print(f"\n{key:28s} {'mean':>8s} {'best':>8s}")
            for tool, values in (('reference', ref), ('nnunet_lite', ours_t)):
                print(f"  {tool:26s} {statistics.mean(values):8.3f} {min(values):8.3f}")
            print(f"  ratio (reference / nnunet_lite): {statistics.mean(ref) / statistics.mean(ours_t):.2f}x")
            if key != 's/epoch':
                for tool, values, precision in (('reference', ref, reference_precision),
                                                ('nnunet_lite', ours_t, ours_precision)):
                    peak, how = machine_peak_gflops(args.device, precision)
                    print(flops_line(f'{tool} ({precision})', flops, statistics.mean(values), peak) + f'  [{how}]')
    finally:
        if not args.out: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
