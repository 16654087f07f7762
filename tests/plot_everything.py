"""Call every exported drawing function of nnunet_lite on tiny synthetic data, from a plain script.

    MPLBACKEND=Agg python tests/plot_everything.py [OUT_DIR]

Imports the modules in notebook order (read from the notebooks' `#| default_exp` cells), draws each figure
into a PNG under OUT_DIR (a temporary folder by default) and exits 1, listing what went wrong, when a drawing
function raises, writes no or an empty PNG, or when a public function or class of the package mentions `plt.`,
`Figure(` or `widgets.` and this script does not call it (add it to CALLS below). tests/test_house.py runs it
in a fresh interpreter, so that nothing a notebook imported can hide a missing import.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'nnunet_lite'
DRAWS = re.compile(r'\bplt\.|\bFigure\(|\bwidgets\.')
PNG = b'\x89PNG\r\n\x1a\n'
DEFAULT_EXP = re.compile(r'^#\|\s*default_exp\s+(\S+)', re.M)


def notebook_modules(nbs: Path = ROOT / 'nbs') -> list[tuple[str, str]]:
    "(notebook file name, module) for each notebook with a `#| default_exp` cell, in file name order."
    found = []
    for nb in sorted((p for p in nbs.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts),
                     key=lambda p: p.name):
        for cell in json.loads(nb.read_text(encoding='utf-8'))['cells']:
            source = cell.get('source', '')
            match = DEFAULT_EXP.search(source if isinstance(source, str) else ''.join(source))
            if match:
                found.append((nb.name, match.group(1)))
                break
    return found


def drawing_functions(modules: dict) -> set[str]:
    "'module.name' of each public function or class whose source mentions plt., Figure( or widgets."
    found = set()
    for short, mod in modules.items():
        for name, obj in vars(mod).items():
            if name.startswith('_') or not (inspect.isfunction(obj) or inspect.isclass(obj)): continue
            if obj.__module__ != mod.__name__: continue
            if DRAWS.search(inspect.getsource(obj)): found.add(f'{short}.{name}')
    return found


# -- the calls: one per drawing function, in notebook order; each draws on `c` (the synthetic data), saves --
CALLS = {}

def draws(name):
    "Register a call of the drawing function `name` ('module.function')."
    def register(fn):
        CALLS[name] = fn
        return fn
    return register


@draws('viz.label_colors')
def _label_colors(c, save):
    colors = c.viz.label_colors(4)
    assert colors.shape == (4, 4) and colors[0, 3] == 0, f'label_colors(4): {colors}'
    fig, ax = c.plt.subplots(figsize=(2, 1))
    ax.imshow(colors[None])
    save(fig)


@draws('viz.show_slice')
def _show_slice(c, save):
    fig, axs = c.plt.subplots(1, 3, figsize=(6, 2))
    c.viz.show_slice(axs[0], c.image[0], c.label, axis=0, spacing=c.geometry.spacing)
    c.viz.show_slice(axs[1], c.image[0], c.label, axis=1, spacing=c.geometry.spacing, contour=True)
    c.viz.show_slice(axs[2], None, c.label, axis=2, spacing=c.geometry.spacing)
    save(fig)


@draws('viz.show_volumes')
def _show_volumes(c, save):
    volumes = {'image': c.image[0], 'label': (c.image[0], c.label), 'only label': (None, c.label)}
    save(c.viz.show_volumes(volumes, c.geometry.spacing, label_names=c.dataset_json['labels'], modality='CT',
                            size=1.5))


@draws('viz.show_case')
def _show_case(c, save):
    save(c.viz.show_case(c.raw, c.train_id, size=1.5))
    save(c.viz.show_case(c.raw, c.test_id, size=1.5))  # a held-out case: no label


@draws('viz.SliceViewer')
def _slice_viewer(c, save):
    two_channels = c.np.stack([c.image[0], -c.image[0]])
    viewer = c.viz.SliceViewer({'a': (two_channels, c.label), 'b': c.label}, c.geometry.spacing,
                               c.dataset_json['labels'], 'CT', size=1.5)
    save(viewer.fig)
    viewer.channel.value = 1      # each control redraws
    save(viewer.fig)
    viewer.plane.value = 2
    save(viewer.fig)
    save(viewer.draw())


@draws('viz.view_case')
def _view_case(c, save):
    viewer = c.viz.view_case(c.raw, c.train_id, prediction=c.label, size=1.5)
    save(viewer.draw())
    viewer.opacity.value, viewer.slice.value = 0.8, 1
    save(viewer.fig)


@draws('fingerprint.plot_fingerprint')
def _plot_fingerprint(c, save):
    save(c.fingerprint.plot_fingerprint(c.fp, c.dataset_json['channel_names'], bins=10))


@draws('plans.plot_plan')
def _plot_plan(c, save):
    save(c.plans.plot_plan(c.plan, size=1.5))


@draws('plans.plan_explorer')
def _plan_explorer(c, save):
    import IPython.display
    shown = []
    with _patched(IPython.display, 'display', lambda *objs, **kw: shown.extend(objs)):
        box = c.plans.plan_explorer(n_cases=4)
        preset, gpu = box.children[0].children
        preset.value = 'resenc_l'     # the preset sets its own GPU (24 GB): plans and draws again
        assert gpu.value == 24, gpu.value
        gpu.value = 16                # the GPU slider: plans and draws again
    figures = [o for o in shown if isinstance(o, c.Figure)]
    assert len(figures) >= 3, f'plan_explorer displayed {shown}: a figure at the start and after each change?'
    for fig in figures: save(fig)


@draws('network.draw_network')
def _draw_network(c, save):
    ax = c.network.draw_network(c.net, c.patch_size)        # on its own figure
    save(ax.figure)
    fig, ax = c.plt.subplots(figsize=(4, 3))
    assert c.network.draw_network(c.net, c.patch_size, ax=ax) is ax
    save(fig)
    resenc = c.plans.plan_experiment(c.fp, c.dataset_json, preset='resenc_m')   # a residual encoder, drawn
    net = c.network.build_network(c.plans.Configuration.from_plans(resenc, '3d_fullres'), c.dataset_json)
    save(c.network.draw_network(net, resenc['configurations']['3d_fullres']['patch_size']).figure)


@draws('augmentation.show_batch')
def _show_batch(c, save):
    import torch
    image = torch.from_numpy(c.image).float()[None].expand(3, -1, -1, -1, -1)       # (B, C, z, y, x)
    noisy, drawn = c.augmentation.gaussian_noise(image, torch.Generator().manual_seed(0), p=1.0)
    fig = c.augmentation.show_batch(image, noisy, [f"σ {s:.2f}" for s in drawn['sigma']])
    assert len(fig.axes) == 2 * 3, f'show_batch drew {len(fig.axes)} axes for 3 samples, expected 6'
    save(fig)
    save(c.augmentation.show_batch(image[:, :, 0], noisy[:, :, 0]))               # a 2D batch, no titles


@draws('augmentation.show_augmented')
def _show_augmented(c, save):
    import math
    import torch
    aug = c.augmentation
    data = torch.from_numpy(c.image).float()[None].expand(3, -1, -1, -1, -1).clone()
    seg = torch.from_numpy(c.label.astype(c.np.int16))[None, None].expand(3, -1, -1, -1, -1).clone()
    out, target, drawn = aug.augment_batch(data, seg, (8, 16, 16), torch.Generator().manual_seed(0),
                                           math.radians(30), ds_scales=[[1, 1, 1], [0.5, 0.5, 0.5]],
                                           p=dict.fromkeys(aug.AUGMENTATION_P, 1.0))     # every transform
    fig = aug.show_augmented(out, target, drawn, titles=['a', 'b', 'c'], forced=[False, False, True])
    assert len(fig.axes) == 2 * 3, f'show_augmented drew {len(fig.axes)} axes for 3 samples, expected 6'
    save(fig)
    save(aug.show_augmented(out[:, :, 4], target[0][:, :, 4]))                       # 2D, nothing drawn
    save(aug.show_augmented(out, torch.cat([target[0] > 0, target[0] > 1], 1)))       # a region target (B, 2)
    # a real batch of the training stream: read, augmented, the forced sample marked
    folder = c.preprocessing.preprocess_dataset(c.raw, c.plan, '3d_fullres', c.tmp / 'pre_augmented',
                                                progress=False)
    settings = c.dataloading.pipeline_settings(c.config, c.dataset_json)
    batches = c.dataloading.TrainingBatches(c.dataloading.PreprocessedDataset(folder), settings, seed=0,
                                            batch_size=3, threads=1)
    try: batch = next(batches)
    finally: batches.close()
    save(aug.show_augmented(batch['data'], batch['target'], batch['drawn'], titles=batch['keys'],
                            forced=batch['forced']))


@draws('training.progress_figure')
def _progress_figure(c, save):
    log = [{'epoch': e, 'train_loss': 1.0 - 0.1 * e, 'val_loss': 1.1 - 0.1 * e, 'mean_fg_dice': 0.2 * e,
            'ema_fg_dice': 0.15 * e, 'dice_organ': 0.3 * e, 'dice_lesion': 0.1 * e, 'dice_vessel': 0.2 * e,
            'lr': 0.01 * (1 - e / 3) ** 0.9, 'epoch_time': 2.0 + e} for e in range(3)]
    save(c.training.progress_figure(log))


@draws('cli.preprocessed_figure')
def _preprocessed_figure(c, save):
    folder = c.preprocessing.preprocess_dataset(c.raw, c.plan, '3d_fullres', c.tmp / 'pre', progress=False)
    save(c.cli.preprocessed_figure(folder, c.train_id))


@draws('cli.prediction_figure')
def _prediction_figure(c, save):
    predictions = c.tmp / 'predictions'                 # the test labels stand in for predictions
    predictions.mkdir()
    ending = c.dataset_json['file_ending']
    label = c.raw / 'labelsTs' / f'{c.test_id}{ending}'
    (predictions / label.name).write_bytes(label.read_bytes())
    save(c.cli.prediction_figure(c.raw, predictions, c.test_id))


@draws('cascade.cascade_input_figure')
def _cascade_input_figure(c, save):
    pre, previous = c.tmp / 'cascade', c.tmp / 'previous_stage'
    cascade = {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}
    plans = {**c.plan, 'configurations': {**c.plan['configurations'], '3d_cascade_fullres': cascade}}
    c.preprocessing.preprocess_dataset(c.raw, plans, '3d_fullres', pre, progress=False)
    c.data.write_json(pre / 'plans.json', plans)
    c.data.write_json(pre / 'dataset.json', c.dataset_json)
    previous.mkdir()                                    # a "first stage" that predicted the labels themselves
    label = c.np.load(pre / '3d_fullres' / f'{c.train_id}_seg.npy')[0]
    c.np.save(previous / f'{c.train_id}.npy', c.np.maximum(label, 0).astype(c.np.uint8))
    save(c.cascade.cascade_input_figure(pre, c.train_id, previous_predictions=previous))


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try: yield
    finally: setattr(owner, name, old)


@draws('ensembling.candidates_figure')
def _candidates_figure(c, save):
    results = c.tmp / 'results'
    dice = {'2d': 0.71, '3d_fullres': 0.78, 'ensemble___2d___3d_fullres___0_1_2_3_4': 0.79}
    sources = {}
    for name, d in dice.items():
        source = results / (f'ensembles/{name}' if name.startswith('ensemble')
                            else f'{name}/crossval_results_folds_0_1_2_3_4')
        summary = {'foreground_mean': {'Dice': d}, 'mean': {'1': {'Dice': d - .05}, '2': {'Dice': d + .05}},
                   'metric_per_case': []}
        c.data.write_json(source / 'summary.json', summary)
        sources[name] = str(source.relative_to(results))
    best = {'name': 'ensemble___2d___3d_fullres___0_1_2_3_4', 'result_on_crossval_post_pp': 0.8}
    c.data.write_json(results / 'inference_instructions.json', {
        'folds': [0, 1, 2, 3, 4], 'all_results': dice, 'crossval_predictions': sources,
        'best_model_or_ensemble': best})
    save(c.ensembling.candidates_figure(results / 'inference_instructions.json'))



def _uncertainty_table(c):
    import pandas as pd
    rng = c.np.random.default_rng(0)
    dice = rng.uniform(0, 1, 12)
    return pd.DataFrame({'score': 2 - dice + rng.normal(0, .2, 12), 'mean_entropy': 1 - dice,
                         'mean_mutual_information': rng.uniform(0, .2, 12), 'Dice': dice,
                         'corruption': ['clean', 'noise_1', 'blur_2', 'missing_organ'] * 3},
                        index=[f'case_{i:03d}' for i in range(12)])


@draws('uncertainty.score_vs_dice_figure')
def _score_vs_dice_figure(c, save):
    save(c.uncertainty.score_vs_dice_figure(_uncertainty_table(c)).figure)


@draws('uncertainty.risk_coverage_figure')
def _risk_coverage_figure(c, save):
    save(c.uncertainty.risk_coverage_figure(_uncertainty_table(c)).figure)


@draws('uncertainty.uncertainty_figure')
def _uncertainty_figure(c, save):
    save(c.uncertainty.uncertainty_figure(_uncertainty_table(c)))


@draws('uncertainty.entropy_overlay')
def _entropy_overlay(c, save):
    image = c.image[0]
    entropy = c.np.abs(c.np.gradient(c.label.astype(float))[0])
    save(c.uncertainty.entropy_overlay(image, c.label, entropy).figure)

def synthetic(modules: dict, tmp: Path) -> SimpleNamespace:
    "The modules, pyplot, and a tiny CT dataset with its fingerprint, plans and network."
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.figure import Figure
    c = SimpleNamespace(**modules, plt=plt, np=np, Figure=Figure, tmp=tmp)
    data = c.data
    c.raw = data.make_synthetic_dataset(tmp / 'ct', 'ct', n_train=3, n_test=1, progress=False,
                                        shape=(12, 20, 20))
    c.dataset_json = data.read_dataset_json(c.raw)
    c.train_id = sorted(data.training_cases(c.raw, c.dataset_json))[0]
    c.test_id = sorted(data.held_out_cases(c.raw, c.dataset_json))[0]
    c.image, c.label, c.geometry, _ = c.viz.read_dataset_case(c.raw, c.train_id)
    c.fp = c.fingerprint.extract_fingerprint(c.raw, workers=1, progress=False, keep_samples=True)
    c.plan = c.plans.plan_experiment(c.fp, c.dataset_json)
    c.config = c.plans.Configuration.from_plans(c.plan, '3d_fullres', c.dataset_json)
    c.net = c.network.build_network(c.config, c.dataset_json)
    c.patch_size = c.plan['configurations']['3d_fullres']['patch_size']
    return c


def main(out: Path) -> int:
    os.environ.setdefault('MPLBACKEND', 'Agg')
    sys.path.insert(0, str(ROOT))          # the working tree, not an installed copy
    modules = {m: importlib.import_module(f'{PACKAGE}.{m}') for _, m in notebook_modules()}
    out.mkdir(parents=True, exist_ok=True)
    c = synthetic(modules, out / 'data')
    problems = []
    for name, call in CALLS.items():
        pngs = []
        def save(fig):
            path = out / f"{name}_{len(pngs)}.png"
            fig.savefig(path, dpi=40)
            pngs.append(path)
            c.plt.close(fig)
        try:
            # the widgets' Output prints outside a notebook
            with contextlib.redirect_stdout(io.StringIO()): call(c, save)
        except Exception as e:
            where = ''.join(traceback.format_tb(e.__traceback__)[-2:])
            problems.append(f"{name}: {type(e).__name__}: {e}\n" + where)
            continue
        bad = [p.name for p in pngs if not p.is_file() or p.read_bytes()[:8] != PNG or p.stat().st_size < 100]
        if not pngs: problems.append(f"{name}: no PNG written")
        elif bad: problems.append(f"{name}: empty or not a PNG: {', '.join(bad)}")
        else: print(f"ok {name}: {len(pngs)} PNG")
    for name in sorted(drawing_functions(modules) - set(CALLS)):
        problems.append(f"{name}: draws (mentions plt./Figure(/widgets.) but {Path(__file__).name} "
                        "does not call it")
    for p in problems: print('FAILED', p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    if len(sys.argv) > 1: sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory() as tmp: sys.exit(main(Path(tmp)))
