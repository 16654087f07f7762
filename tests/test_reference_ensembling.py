"""Ensembling, find-best and a model trained by nnU-Net v2 against the reference: `ensemble_folders` on
folders in the reference's format, `find_best_configuration` on a synthetic results tree (scores, winner,
post-processing), and a tiny model trained by nnunetv2 predicted by the reference and by `nnlite predict`."""
import contextlib
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import types
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from nnunet_lite.data import Geometry, write_image, write_label
from nnunet_lite.ensembling import average_probabilities, ensemble_folders, find_best_configuration
from nnunet_lite.training import load_checkpoint

from cli_runner import nnlite
from reference_oracle import require_reference  # noqa: E402
require_reference()
from reference_oracle import _quiet, _reference_paths, make_fingerprint, reference_plans  # noqa: E402
from nnunetv2.ensembling.ensemble import average_probabilities as reference_average  # noqa: E402
from nnunetv2.ensembling.ensemble import ensemble_folders as reference_ensemble_folders  # noqa: E402

# a non-trivial grid: anisotropic spacing, an origin off zero, a rotated direction (SimpleITK order: x, y, z)
SPACING_XYZ = (0.7, 0.85, 2.5)
ORIGIN = (-12.5, 30.25, 4.75)
_c, _s = np.cos(0.3), np.sin(0.3)
DIRECTION = (_c, -_s, 0.0, _s, _c, 0.0, 0.0, 0.0, 1.0)

MINIMAL_PLANS = {'dataset_name': 'x', 'plans_name': 'p', 'image_reader_writer': 'SimpleITKIO',
                 'configurations': {}, 'original_median_spacing_after_transp': [1, 1, 1],
                 'original_median_shape_after_transp': [1, 1, 1], 'transpose_forward': [0, 1, 2],
                 'transpose_backward': [0, 1, 2], 'experiment_planner_used': 'x',
                 'label_manager': 'LabelManager', 'foreground_intensity_properties_per_channel': {}}


def sitk_geometry(path):
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def write_reference_prediction(folder: Path, case: str, probabilities: np.ndarray, segmentation: np.ndarray):
    """One case of a prediction folder as nnU-Net v2 writes it with --save_probabilities / --npz: CASE.nii.gz,
    CASE.npz ('probabilities', float32) and CASE.pkl (the properties; its sitk_stuff read back from
    CASE.nii.gz, as nnU-Net's properties come from reading the image)."""
    image = sitk.GetImageFromArray(segmentation.astype(np.uint8))
    image.SetSpacing(SPACING_XYZ); image.SetOrigin(ORIGIN); image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(folder / f'{case}.nii.gz'), True)
    spacing, origin, direction = sitk_geometry(folder / f'{case}.nii.gz')
    np.savez_compressed(folder / f'{case}.npz', probabilities=probabilities.astype(np.float32))
    shape = list(segmentation.shape)
    properties = {'sitk_stuff': {'spacing': spacing, 'origin': origin, 'direction': direction},
                  'spacing': [np.float64(s) for s in spacing[::-1]], 'shape_before_cropping': shape,
                  'bbox_used_for_cropping': [[0, s] for s in shape],
                  'shape_after_cropping_and_before_resampling': shape}
    with open(folder / f'{case}.pkl', 'wb') as f: pickle.dump(properties, f)


@contextlib.contextmanager
def in_process_pools():
    """The reference's evaluation, ensembling and post-processing run their work in `spawn` pools (each one
    costs seconds to start: the workers import torch). Here they get a thread pool instead: the same functions
    on the same arguments, in this process."""
    import nnunetv2.ensembling.ensemble as ens
    import nnunetv2.evaluation.evaluate_predictions as ev
    import nnunetv2.postprocessing.remove_connected_components as pp
    import multiprocessing
    shim = types.SimpleNamespace(get_context=lambda method=None: types.SimpleNamespace(Pool=ThreadPool),
                                 Pool=ThreadPool, cpu_count=multiprocessing.cpu_count)
    saved = [(m, m.multiprocessing) for m in (ens, ev, pp)]
    try:
        for m, _ in saved: m.multiprocessing = shim
        yield
    finally:
        for m, original in saved: m.multiprocessing = original


# ------------------------------------------------------------------------------------------------------------
# 1. ensemble_folders
# ------------------------------------------------------------------------------------------------------------

LABELS = {'background': 0, 'organ': 1, 'lesion': 2}
REGIONS = {'background': 0, 'whole': [1, 2], 'core': 2}


def member_folders(root: Path, regions: bool, n_members: int = 3, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    dataset_json = {'channel_names': {'0': 'CT'}, 'labels': REGIONS if regions else LABELS, 'numTraining': 3,
                    'file_ending': '.nii.gz', **({'regions_class_order': [1, 2]} if regions else {})}
    folders = [root / f'member_{m}' for m in range(n_members)]
    shapes = {'case_a': (7, 13, 16), 'case_b': (9, 11, 10), 'case_c': (5, 17, 12)}
    for m, folder in enumerate(folders):
        folder.mkdir(parents=True)
        (folder / 'dataset.json').write_text(json.dumps(dataset_json))
        (folder / 'plans.json').write_text(json.dumps(MINIMAL_PLANS))
        for case, shape in shapes.items():
            logits = ndimage.gaussian_filter(rng.normal(size=(2 if regions else 3, *shape)), (0, 1, 1, 1)) * 6
            if regions:     # per region in [0, 1]; 'core' mostly inside 'whole', as a trained model's
                probabilities = 1 / (1 + np.exp(-logits))
                probabilities[1] = np.minimum(probabilities[1], probabilities[0] + 0.1 * rng.random(shape))
                segmentation = np.zeros(shape, np.uint8)
                for p, label in zip(probabilities, (1, 2)): segmentation[p > 0.5] = label
            else:
                probabilities = np.exp(logits) / np.exp(logits).sum(0)
                segmentation = probabilities.argmax(0)
            write_reference_prediction(folder, case, probabilities, segmentation)
    return folders


@pytest.mark.parametrize("regions", [False, True], ids=['labels', 'regions'])
def test_ensemble_folders_equals_reference(tmp_path, regions):
    folders = member_folders(tmp_path, regions)
    theirs, ours = tmp_path / 'theirs', tmp_path / 'ours'
    with _quiet():
        reference_ensemble_folders([str(f) for f in folders], str(theirs), save_merged_probabilities=True,
                                   num_processes=1)
    ensemble_folders(folders, ours, save_probabilities=True, progress=False)
    cases = sorted(p.name[:-len('.nii.gz')] for p in theirs.glob('*.nii.gz'))
    assert cases == ['case_a', 'case_b', 'case_c']
    assert sorted(p.name[:-len('.nii.gz')] for p in ours.glob('*.nii.gz')) == cases
    n_channels = 2 if regions else 3
    for case in cases:
        reference_seg = sitk.ReadImage(str(theirs / f'{case}.nii.gz'))
        our_seg = sitk.ReadImage(str(ours / f'{case}.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(our_seg), sitk.GetArrayFromImage(reference_seg))
        assert sitk_geometry(ours / f'{case}.nii.gz') == sitk_geometry(theirs / f'{case}.nii.gz')
        np.testing.assert_allclose(sitk_geometry(ours / f'{case}.nii.gz')[0], SPACING_XYZ, rtol=1e-6)
        labels_present = set(np.unique(sitk.GetArrayFromImage(reference_seg)).tolist())
        assert labels_present == {0, 1, 2}, labels_present          # the data exercises every label

        reference_probabilities = np.load(theirs / f'{case}.npz')['probabilities']
        with np.load(ours / f'{case}.npz') as npz: our_probabilities = npz['probabilities']
        assert reference_probabilities.dtype == np.float32 and reference_probabilities.shape[0] == n_channels
        assert our_probabilities.shape == reference_probabilities.shape
        np.testing.assert_allclose(our_probabilities.astype(np.float32), reference_probabilities,
                                   rtol=0, atol=1e-3)

        members = [f / f'{case}.npz' for f in folders]
        in_memory = average_probabilities(members)
        reference_in_memory = reference_average([str(m) for m in members])
        assert in_memory.dtype == reference_in_memory.dtype == np.float32
        np.testing.assert_array_equal(in_memory, reference_in_memory)
        np.testing.assert_array_equal(in_memory, reference_probabilities)


# ------------------------------------------------------------------------------------------------------------
# 2. find_best_configuration
# ------------------------------------------------------------------------------------------------------------

FOLDS = (0, 1, 2, 3, 4)
CONFIGS = ('2d', '3d_fullres', '3d_lowres')
N_CASES = 10


@pytest.fixture(scope='module')
def real_plans():
    "Reference plans with 2d, 3d_fullres and 3d_lowres (a large isotropic fingerprint), made once."
    fingerprint, dataset_json = make_fingerprint((1.0, 1.0, 1.0), (256, 256, 256), num_cases=N_CASES)
    plans = reference_plans(fingerprint, dataset_json)
    assert set(CONFIGS) <= set(plans['configurations'])
    return plans, dataset_json


def truth_case(rng, split_lesion: bool) -> np.ndarray:
    shape = (10, 18, 20)
    gt = np.zeros(shape, np.uint8)
    z, y, x = rng.integers(2, 4), rng.integers(2, 6), rng.integers(2, 6)
    gt[z:z + 6, y:y + 9, x:x + 10] = 1
    gt[z + 2:z + 4, y + 3:y + 6, x + 3:x + 6] = 2
    if split_lesion: gt[8:10, 15:18, 16:19] = 2        # a second lesion, outside the organ
    return gt


def predicted_probabilities(gt: np.ndarray, rng, noise: float, strays: int) -> np.ndarray:
    "softmax(one-hot * 4 + smooth noise), with `strays` small spurious organ/lesion blobs in the background."
    onehot = np.stack([gt == c for c in range(3)]).astype(np.float64)
    noise_field = ndimage.gaussian_filter(rng.normal(size=onehot.shape), (0, 1, 1, 1)) * noise * 4
    logits = onehot * 4 + noise_field
    for _ in range(strays):
        z, y, x = (rng.integers(0, gt.shape[0] - 2), rng.integers(0, gt.shape[1] - 3),
                   rng.integers(0, gt.shape[2] - 3))
        if (gt[z:z + 2, y:y + 3, x:x + 3] == 0).all():
            logits[rng.integers(1, 3), z:z + 2, y:y + 3, x:x + 3] += 9
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


PROFILES = {   # per configuration: (noise level, most stray blobs per case)
    'apart': {'2d': (0.9, 2), '3d_fullres': (0.7, 1), '3d_lowres': (1.1, 3)},    # one model clearly best
    'even': {'2d': (1.6, 1), '3d_fullres': (1.5, 1), '3d_lowres': (1.7, 1)},     # noise rules: ensembles help
}


def results_tree(root: Path, ds: str, plans: dict, dataset_json: dict, seed: int, split_lesion: bool,
                 profile: str):
    """nnUNet_raw/<ds>/dataset.json, nnUNet_preprocessed/<ds>/{nnUNetPlans.json, dataset.json,
    gt_segmentations}, nnUNet_results/<ds>/nnUNetTrainer__nnUNetPlans__<c>/{plans.json, dataset.json,
    fold_f/validation/...}."""
    rng = np.random.default_rng(seed)
    plans = {**plans, 'dataset_name': ds}
    raw, pre, res = root / 'nnUNet_raw' / ds, root / 'nnUNet_preprocessed' / ds, root / 'nnUNet_results' / ds
    for d in (raw, pre / 'gt_segmentations'): d.mkdir(parents=True)
    for d in (raw, pre): (d / 'dataset.json').write_text(json.dumps(dataset_json))
    (pre / 'nnUNetPlans.json').write_text(json.dumps(plans))
    cases = [f'case_{i:03d}' for i in range(N_CASES)]
    truths = {c: truth_case(rng, split_lesion and i % 3 == 0) for i, c in enumerate(cases)}
    for c, gt in truths.items():
        image = sitk.GetImageFromArray(gt)
        image.SetSpacing(SPACING_XYZ); image.SetOrigin(ORIGIN); image.SetDirection(DIRECTION)
        sitk.WriteImage(image, str(pre / 'gt_segmentations' / f'{c}.nii.gz'), True)
    for config in CONFIGS:
        noise, strays = PROFILES[profile][config]
        model = res / f'nnUNetTrainer__nnUNetPlans__{config}'
        model.mkdir(parents=True)
        (model / 'plans.json').write_text(json.dumps(plans))
        (model / 'dataset.json').write_text(json.dumps(dataset_json))
        for fold in FOLDS:
            validation = model / f'fold_{fold}' / 'validation'
            validation.mkdir(parents=True)
            for c in cases[2 * fold:2 * fold + 2]:
                probabilities = predicted_probabilities(truths[c], rng, noise, rng.integers(0, strays + 1))
                write_reference_prediction(validation, c, probabilities, probabilities.argmax(0))
    return res


@pytest.mark.parametrize("seed,split_lesion,profile",
                         [(0, False, 'apart'), (1, True, 'apart'), (2, False, 'even')])
def test_find_best_equals_reference(tmp_path, real_plans, seed, split_lesion, profile):
    plans, dataset_json = real_plans
    ds = 'Dataset951_FindBest'
    results_tree(tmp_path / 'theirs', ds, plans, dataset_json, seed, split_lesion, profile)
    shutil.copytree(tmp_path / 'theirs', tmp_path / 'ours')

    models = [{'plans': 'nnUNetPlans', 'configuration': c, 'trainer': 'nnUNetTrainer'} for c in CONFIGS]
    with _reference_paths(tmp_path / 'theirs') as folders, _quiet(), in_process_pools():
        from nnunetv2.evaluation.find_best_configuration import find_best_configuration as reference_find_best
        reference = reference_find_best(ds, allowed_trained_models=models, allow_ensembling=True,
                                        num_processes=1, overwrite=True, folds=FOLDS, strict=False)
    assert Path(folders['nnUNet_results']) == tmp_path / 'theirs' / 'nnUNet_results'

    ours = find_best_configuration(tmp_path / 'ours' / 'nnUNet_results' / ds,
                                   gt_dir=tmp_path / 'ours' / 'nnUNet_preprocessed' / ds / 'gt_segmentations',
                                   progress=False)

    # the same candidates, in the same order, with the same scores
    assert list(ours['all_results']) == list(reference['all_results'])
    assert len(ours['all_results']) == 6
    for name, score in reference['all_results'].items():
        assert abs(ours['all_results'][name] - score) < 1e-6, (name, ours['all_results'][name], score)
    assert len(set(np.round(list(reference['all_results'].values()), 6))) > 1     # the candidates do differ

    # the same winner: the reference names it by where its post-processing lives
    reference_pp = Path(reference['best_model_or_ensemble']['postprocessing_file']).parent
    in_ensembles = reference_pp.parent.name == 'ensembles'
    reference_best = reference_pp.name if in_ensembles else reference_pp.parent.name
    best, theirs = ours['best_model_or_ensemble'], reference['best_model_or_ensemble']
    assert best['name'] == reference_best
    assert abs(best['result_on_crossval_pre_pp'] - theirs['result_on_crossval_pre_pp']) < 1e-6
    assert abs(best['result_on_crossval_post_pp'] - theirs['result_on_crossval_post_pp']) < 1e-6

    # the same post-processing steps
    reference_pp_json = json.loads((reference_pp / 'postprocessing.json').read_text())
    reference_steps = [k['labels_or_regions'] for k in reference_pp_json['postprocessing_kwargs']]
    reference_steps = [[int(v) for v in s] if isinstance(s, list) else [int(s)] for s in reference_steps]
    assert [[int(v) for v in s] for s in best['postprocessing_steps']] == reference_steps
    assert reference_steps, "the data should make post-processing choose at least one step"
    # the data does what it is made for: one model clearly best, or (noise dominating) an ensemble
    assert reference_best.startswith('ensemble___') == (profile == 'even'), reference['all_results']


# ------------------------------------------------------------------------------------------------------------
# 3. a model trained by nnunetv2, predicted by both
# ------------------------------------------------------------------------------------------------------------

TINY = 'Dataset952_TinyTrained'
TINY_GEOMETRY = Geometry((1.6, 0.9, 0.8), (-10.0, 5.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

REFERENCE_SCRIPT = """
import os, sys
import numpy as np, torch
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                  preprocess)

def main(ds_id, ds_name, out):
    extract_fingerprints([ds_id], num_processes=1, check_dataset_integrity=False, verbose=False,
                         show_progress_bar=False)
    plan_experiments([ds_id])
    preprocess([ds_id], configurations=('3d_fullres',), num_processes=(1,), verbose=False,
               show_progress_bar=False)
    os.environ['nnUNet_n_proc_DA'] = '0'          # only now: planning calls torch.set_num_threads with it
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    torch.manual_seed(0); np.random.seed(0)
    trainer = get_trainer_from_args(str(ds_id), '3d_fullres', 0, 'nnUNetTrainer', 'nnUNetPlans', False,
                                    device=torch.device('cpu'))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, ITERS, 1
    trainer.run_training()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device('cpu'), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        os.path.join(os.environ['nnUNet_results'], ds_name, 'nnUNetTrainer__nnUNetPlans__3d_fullres'),
        use_folds=(0,), checkpoint_name='checkpoint_final.pth')
    os.makedirs(out, exist_ok=True)
    predictor.predict_from_files_sequential(os.path.join(os.environ['nnUNet_raw'], ds_name, 'imagesTs'), out,
                                            save_probabilities=False, overwrite=True)

if __name__ == '__main__':
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
"""
TRAIN_ITERATIONS = 30


def tiny_raw_dataset(raw: Path):
    """6 training and 2 test cases of 16 x 24 x 28: a cube (label 1) with a smaller cube inside (label 2),
    bright enough that 30 iterations give a network whose argmax is not a near-tie (an untrained one's is, and
    then the reference's float16 accumulation of the tiles' logits alone flips ~1 % of the voxels)."""
    rng = np.random.default_rng(0)
    for i in range(8):
        seg = np.zeros((16, 24, 28), np.uint8)
        c = rng.integers(6, 12, 3)
        seg[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = 1
        seg[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 2
        image = seg.astype(np.float32) * 50 + rng.normal(size=seg.shape).astype(np.float32) * 10
        if i < 6:
            write_image(image, TINY_GEOMETRY, raw / 'imagesTr', f'case_{i:03d}')
            write_label(seg, TINY_GEOMETRY, raw / 'labelsTr' / f'case_{i:03d}.nii.gz')
        else:
            write_image(image, TINY_GEOMETRY, raw / 'imagesTs', f'test_{i - 6:03d}')
    (raw / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'labels': LABELS,
                                                  'numTraining': 6, 'file_ending': '.nii.gz'}))


def test_model_trained_by_nnunetv2_predicts_the_same(tmp_path):
    roots = {v: tmp_path / v for v in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values(): d.mkdir()
    tiny_raw_dataset(roots['nnUNet_raw'] / TINY)
    script = tmp_path / 'reference_train_predict.py'
    script.write_text(REFERENCE_SCRIPT.replace('ITERS', str(TRAIN_ITERATIONS)))
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, 'nnUNet_def_n_proc': '1',
           'nnUNet_compile': 'f'}
    env.pop('nnUNet_n_proc_DA', None)
    reference_out = tmp_path / 'reference_predictions'
    r = subprocess.run([sys.executable, str(script), TINY[7:10], TINY, str(reference_out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = roots['nnUNet_results'] / TINY / 'nnUNetTrainer__nnUNetPlans__3d_fullres'
    checkpoint_file = model / 'fold_0' / 'checkpoint_final.pth'

    # our loader takes the reference's checkpoint with weights_only (numpy scalars in it: plain torch refuses)
    with pytest.raises(Exception):
        torch.load(checkpoint_file, map_location='cpu', weights_only=True)
    ours = load_checkpoint(checkpoint_file)
    unsafe = torch.load(checkpoint_file, map_location='cpu', weights_only=False)
    assert ours['trainer_name'] == 'nnUNetTrainer' and ours['init_args']['configuration'] == '3d_fullres'
    assert isinstance(ours['_best_ema'], np.floating) and ours['current_epoch'] == 1
    assert list(ours['network_weights']) == list(unsafe['network_weights'])
    for k, w in unsafe['network_weights'].items(): assert torch.equal(ours['network_weights'][k], w), k

    # both predict the test images alike, on the same grid
    agreement = {}
    for flags in ((), ('--no-amp',)):
        out = tmp_path / ('ours' + ''.join(flags))
        r = nnlite('predict', '-i', roots['nnUNet_raw'] / TINY / 'imagesTs', '-o', out, '-m', model,
                   '--device', 'cpu', '-q', *flags)
        assert r.returncode == 0, r.stdout + r.stderr
        same = total = 0
        for case in ('test_000', 'test_001'):
            reference_seg = sitk.ReadImage(str(reference_out / f'{case}.nii.gz'))
            our_seg = sitk.ReadImage(str(out / f'{case}.nii.gz'))
            assert sitk_geometry(out / f'{case}.nii.gz') == sitk_geometry(reference_out / f'{case}.nii.gz')
            np.testing.assert_allclose(our_seg.GetSpacing(), TINY_GEOMETRY.spacing[::-1], rtol=1e-6)
            np.testing.assert_allclose(our_seg.GetOrigin(), TINY_GEOMETRY.origin, rtol=1e-6)
            a, b = sitk.GetArrayFromImage(reference_seg), sitk.GetArrayFromImage(our_seg)
            assert set(np.unique(a).tolist()) == {0, 1, 2}     # the trained model does segment both labels
            same, total = same + int((a == b).sum()), total + a.size
        agreement[flags] = same / total
    print('voxel agreement with the reference:', {' '.join(k) or 'amp': v for k, v in agreement.items()})
    # the reference runs the network in float32 on a CPU; ours autocasts to bfloat16 where the CPU has it
    assert agreement[('--no-amp',)] >= 0.999 and agreement[()] >= 0.99, agreement

    # a checkpoint carrying an arbitrary pickled object is refused, in one line
    evil_model = tmp_path / 'evil_model'
    shutil.copytree(model, evil_model)
    unsafe['evil'] = pathlib.Path('/')
    torch.save(unsafe, evil_model / 'fold_0' / 'checkpoint_final.pth')
    with pytest.raises(ValueError, match='refused'):
        load_checkpoint(evil_model / 'fold_0' / 'checkpoint_final.pth')
    r = nnlite('predict', '-i', roots['nnUNet_raw'] / TINY / 'imagesTs', '-o', tmp_path / 'evil_out', '-m',
               evil_model, '--device', 'cpu', '-q')
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'refused' in lines[0], r.stderr
    print(lines[0])
    assert not any((tmp_path / 'evil_out').glob('*.nii.gz'))
