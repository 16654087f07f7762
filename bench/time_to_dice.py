"""Time to Dice: the validation Dice nnunet_lite and the reference nnU-Net v2 each reach when they train the same
synthetic dataset for the same wall-clock budget, on the same machine, in one run. This is the figure a user feels:
"I have five minutes of this CPU; how good a model do I get?"

What it measures
----------------
1. Writes a synthetic CT-like dataset (default 10 cases of 32x48x48 voxels: organ, nested lesion, thin vessel),
   plans it (the 3d_fullres configuration; `--patch`/`--batch-size` override the plan's), preprocesses it with
   nnunet_lite and writes the same arrays in the reference's format (`bench/dataloading.py`'s `build`), so both
   train on identical data with the same five folds (fold 0: 8 training, 2 validation cases).
2. For each budget (`--budgets`, minutes) and each tool, a fresh training of fold 0 that must end within the budget.
   The clock starts before the tool builds its trainer's data loaders (its worker start-up counts) and stops after
   its last epoch. Both run their own epoch loop unchanged (`--iters` training + `--val-iters` validation steps,
   full augmentation, the per-epoch pseudo Dice, checkpoints and progress figure), with one rule for both:
   after every epoch the schedule is re-sized to end at the budget (epochs = epochs done + the seconds left /
   the last epoch's seconds, timed from its first step's return so that the loader's start-up does not count as
   an epoch's cost), and the poly learning rate follows that length (for the reference its
   `PolyLRScheduler.max_steps`). Training stops when another epoch would not fit. A faster tool therefore gets more
   iterations in the same time, with a learning rate that still decays to ~0 at its end.
   Reference: `nnUNetTrainer` driven from Python with its `run_training` loop; ours: `Trainer.run_epoch` and
   `after_epoch`, as `Trainer.fit` runs them.
3. Validation Dice: both final checkpoints are loaded by the same predictor (nnunet_lite's `Predictor`, which loads
   nnU-Net v2 checkpoints: sliding window, Gaussian weighting, mirroring) and predict fold 0's validation images
   from the raw files; `evaluate_folder` scores them against the raw labels. So the Dice differs only by what was
   learned in the budget. The reference's own predictor gives the same numbers for the same weights (tested in
   tests/test_reference_inference.py), it is only slower.

How to read it
--------------
One row per tool and budget: iterations done, seconds used, mean foreground Dice and Dice per class. Mixed precision
as each tool does it on this machine (the reference: float32 on a CPU, float16 on a GPU; ours: bf16 where the CPU
or GPU has it, else float32); `--no-amp` trains ours in float32. Short budgets are noisy (one seed, one fold, a
class can appear late in training): run `--seeds 3` to see the spread.

Run from the repository root: `python bench/time_to_dice.py [--budgets 2,5,10] [--device cuda] [--no-amp]`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import precisions   # bench/common.py
from training import build_for_trainers   # bench/training.py: the same data, plans and folders as its timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budgets', default='2,5', help='wall-clock training budgets in minutes (default 2,5)')
    p.add_argument('--cases', type=int, default=10, help='training cases (default 10: fold 0 validates on 2)')
    p.add_argument('--shape', default='32,48,48', help='shape of one raw case (default 32,48,48, as the demo)')
    p.add_argument('--patch', default=None, help="patch size (default: the plan's)")
    p.add_argument('--batch-size', type=int, default=None, help="batch size (default: the plan's)")
    p.add_argument('--iters', type=int, default=25, help='training iterations per epoch (default 25)')
    p.add_argument('--val-iters', type=int, default=5, help='validation iterations per epoch (default 5)')
    p.add_argument('-np', '--workers', type=int, default=2,
                   help="the reference's augmentation worker processes = our reading threads (default 2)")
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--seeds', type=int, default=1, help='trainings per tool and budget, seeds 0, 1, ... (default 1)')
    p.add_argument('--tools', default='reference,nnunet_lite', help='which tools to train (default both)')
    p.add_argument('--no-amp', action='store_true', help='train ours in float32 (as the reference on a CPU)')
    p.add_argument('--out', default=None, help='working folder, kept (default: a temporary folder)')
    return p.parse_args(argv)


def more_epochs(budget_s: float, elapsed_s: float, epoch_s: float) -> int:
    "How many more epochs of `epoch_s` seconds fit in what is left of the budget."
    return max(0, math.floor((budget_s - elapsed_s) / max(epoch_s, 1e-9)))


class StepClock:
    "Wraps a train_step and notes when each call returns."
    def __init__(self, step):
        self.step, self.ends = step, []

    def __call__(self, batch):
        out = self.step(batch)
        self.ends.append(time.perf_counter())
        return out

    def epoch_seconds(self, start: float, end: float, iterations: int) -> float:
        """An epoch's steady-state seconds: from its first step's return to its end, scaled back up to all its
        steps. The first step waits for the loader's first batches (worker start-up in the first epoch); left out,
        the first epoch predicts the later ones instead of overstating them."""
        first = next(t for t in self.ends if t > start)
        return (end - first) * iterations / max(iterations - 1, 1)


def train_reference(pre: Path, plans: dict, args, budget_s: float, folder: Path, seed: int) -> dict:
    "The reference's run_training loop, re-sized to the budget after every epoch. Returns what it did."
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    torch.manual_seed(seed)
    os.environ['nnUNet_n_proc_DA'] = str(args.workers)
    dataset_json = json.loads((pre / 'dataset.json').read_text())
    trainer = nnUNetTrainer({**plans, 'continue_training': False}, '3d_fullres', 0, dataset_json,
                            device=torch.device(args.device))
    trainer.output_folder_base, trainer.output_folder = str(folder), str(folder / 'fold_0')
    (folder / 'fold_0').mkdir(parents=True, exist_ok=True)
    trainer.log_file = str(folder / 'fold_0' / 'training_log.txt')
    trainer.print_to_log_file = lambda *a, **k: None     # its per-epoch lines would drown this bench's output
    trainer.plot_network_architecture = lambda: None
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = args.iters, args.val_iters
    trainer.num_epochs = 1000   # the first epoch's learning rate does not depend on it; re-sized after each epoch
    t0 = time.perf_counter()
    trainer.on_train_start()
    trainer.lr_scheduler.max_steps = trainer.num_epochs
    done, clock = 0, StepClock(trainer.train_step)
    while done < trainer.num_epochs:
        e0 = time.perf_counter()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [clock(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            outputs = [trainer.validation_step(next(trainer.dataloader_val))
                       for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(outputs)
        trainer.on_epoch_end()
        done, now = done + 1, time.perf_counter()
        trainer.num_epochs = trainer.lr_scheduler.max_steps = done + more_epochs(
            budget_s, now - t0, clock.epoch_seconds(e0, now, args.iters))
    trainer.on_train_end()
    return {'epochs': done, 'iterations': done * args.iters, 'seconds': time.perf_counter() - t0}


def train_ours(pre: Path, args, budget_s: float, folder: Path, seed: int) -> dict:
    "Our Trainer's epochs (run_epoch + after_epoch, as fit runs them), re-sized to the budget after every epoch."
    from nnunet_lite.training import Trainer
    t0 = time.perf_counter()
    trainer = Trainer(pre / 'nnlite', '3d_fullres', 0, output_dir=folder / 'fold_0', epochs=1000,
                      iterations=args.iters, val_iterations=args.val_iters, device=args.device,
                      threads=args.workers, seed=seed, amp=not args.no_amp, progress=False)
    trainer._claim_model_folder()
    trainer.train_step = clock = StepClock(trainer.train_step)   # run_epoch calls self.train_step
    train, val = trainer.batch_streams()
    try:
        while trainer.epoch < trainer.epochs:
            e0 = time.perf_counter()
            trainer.after_epoch(trainer.run_epoch(train, val))
            now = time.perf_counter()
            trainer.epochs = trainer.epoch + more_epochs(budget_s, now - t0, clock.epoch_seconds(e0, now, args.iters))
    finally:
        train.close(); val.close()
    trainer.save('checkpoint_final.pth')
    return {'epochs': trainer.epoch, 'iterations': trainer.epoch * args.iters, 'seconds': time.perf_counter() - t0}


def validation_dice(model_dir: Path, raw: Path, val_cases: list[str], work: Path, device: str) -> dict:
    "Predict fold 0's validation images from the raw files with our Predictor and score them: the summary's means."
    from nnunet_lite.evaluation import evaluate_folder
    from nnunet_lite.inference import Predictor
    images, predictions = work / 'images', work / 'predictions'
    shutil.rmtree(work, ignore_errors=True); images.mkdir(parents=True)
    for case in val_cases:
        for f in raw.glob(f'imagesTr/{case}_*'): os.symlink(f.resolve(), images / f.name)
    predictor = Predictor(model_dir, folds=[0], device=device, progress=False)
    predictor.predict_folder(images, predictions, overwrite=True)
    labels = work / 'labels'; labels.mkdir()
    for case in val_cases:
        for f in raw.glob(f'labelsTr/{case}.*'): os.symlink(f.resolve(), labels / f.name)
    summary = evaluate_folder(predictions, labels, predictor.dataset_json, progress=False)
    names = {str(v): k for k, v in predictor.dataset_json['labels'].items()}
    return {'Dice': summary['foreground_mean']['Dice'],
            **{names.get(str(c), str(c)): m['Dice'] for c, m in summary['mean'].items()}}


def main(argv=None):
    args = parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(',')]
    tools = args.tools.split(',')
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='nnlite_bench_dice_'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        pre, plans = build_for_trainers(args, root)
        ours = pre / 'nnlite'
        from nnunet_lite.preprocessing import preprocessed_cases
        from nnunet_lite.training import fold_cases, load_or_make_splits
        case_ids = preprocessed_cases(ours / '3d_fullres')
        _, val_cases = fold_cases(load_or_make_splits(ours, case_ids), 0, case_ids)
        shutil.copy(ours / 'splits_final.json', pre / 'splits_final.json')   # the same five folds for the reference
        cfg = plans['configurations']['3d_fullres']
        reference_precision, our_precision = precisions(args.device, args.no_amp)
        print(f"plan: patch {cfg['patch_size']}, batch {cfg['batch_size']}, features "
              f"{cfg['architecture']['arch_kwargs']['features_per_stage']}; fold 0: {len(case_ids) - len(val_cases)} "
              f"training, {len(val_cases)} validation cases; epochs of {args.iters} + {args.val_iters} iterations; "
              f"device {args.device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; precision: "
              f"reference {reference_precision}, nnunet_lite {our_precision}", flush=True)
        raw = root / 'nnUNet_raw' / pre.name
        rows = []
        for budget in budgets:
            for seed in range(args.seeds):
                for tool in tools:
                    folder = root / 'runs' / f'{tool}_{budget:g}min_seed{seed}'
                    shutil.rmtree(folder, ignore_errors=True)
                    if tool == 'reference': run = train_reference(pre, plans, args, budget * 60, folder, seed)
                    else: run = train_ours(pre, args, budget * 60, folder, seed)
                    dice = validation_dice(folder, raw, val_cases, root / 'eval' / folder.name, args.device)
                    rows.append({'budget min': budget, 'tool': tool, 'seed': seed, **run, **dice})
                    print(f"  {budget:g} min  {tool:12s} seed {seed}: {run['iterations']:4d} iterations in "
                          f"{run['seconds']:5.0f} s, validation Dice {dice['Dice']:.3f} ("
                          + ', '.join(f'{k} {v:.3f}' for k, v in dice.items() if k != 'Dice') + ')', flush=True)
        import pandas as pd
        table = pd.DataFrame(rows)
        means = table.groupby(['budget min', 'tool'], sort=False).mean(numeric_only=True).drop(columns='seed')
        print('\nmean over seeds:\n' + means.round(3).to_string())
        (root / 'time_to_dice.json').write_text(json.dumps(rows, indent=1))
    finally:
        if not args.out: shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
