"""The whole training pipeline (`augment_batch`, `TrainingBatches`): probabilities measured over many
batches, label integrity under every spatial transform in 3D, dummy 2D and 2D, masking, foreground share and
determinism."""
import json
import math

import numpy as np
import pytest
import torch

from nnunet_lite.augmentation import AUGMENTATION_P, applied_transforms, augment_batch
from nnunet_lite.dataloading import (PreprocessedDataset, TrainingBatches, augmentation_geometry,
                                     pipeline_settings, source_patch_size, training_regions)
from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.plans import Configuration, mirrored_axes, plan_experiment
from nnunet_lite.preprocessing import preprocess_dataset, sample_class_locations, save_case


def tol(p, n):
    return 4.5 * math.sqrt(p * (1 - p) / n)


def test_pipeline_applies_each_transform_with_its_probability():
    g = torch.Generator().manual_seed(0)
    n_batches, b = 150, 16
    counts = {k: 0 for k in ('rotated', 'scaled', 'noise', 'blur', 'brightness', 'contrast', 'low_resolution',
                             'inverted_gamma', 'gamma')}
    flips, blur_channels, lowres_channels = [], [], []
    for _ in range(n_batches):
        data = torch.randn(b, 2, 6, 7, 8, generator=g)
        seg = torch.randint(-1, 3, (b, 1, 6, 7, 8), generator=g).to(torch.int16)
        _, _, drawn = augment_batch(data, seg, (4, 5, 6), g, rotation=math.radians(30),
                                    ds_scales=[[1, 1, 1], [.5, .5, .5]])
        counts['rotated'] += drawn['spatial']['rotated'].sum().item()
        counts['scaled'] += drawn['spatial']['scaled'].sum().item()
        for k in ('noise', 'blur', 'brightness', 'contrast', 'low_resolution', 'inverted_gamma', 'gamma'):
            counts[k] += drawn[k]['applied'].sum().item()
        flips.append(drawn['mirror']['flips'])
        blur_channels.append(drawn['blur']['channels'][drawn['blur']['applied']])
        lowres_channels.append(drawn['low_resolution']['channels'][drawn['low_resolution']['applied']])
        sp = drawn['spatial']
        assert sp['angles'].abs().max() <= math.radians(30) + 1e-12
        assert ((sp['scale'] >= 0.7) & (sp['scale'] <= 1.4)).all()
        assert drawn['noise']['sigma'].max() <= 0.1
    n = n_batches * b
    expected = {'rotated': AUGMENTATION_P['rotation'], 'scaled': AUGMENTATION_P['scaling'], **AUGMENTATION_P}
    for k, c in counts.items():
        assert abs(c / n - expected[k]) < tol(expected[k], n), (k, c / n)
    assert abs(torch.cat(flips).double().mean() - 0.5) < tol(0.5, n * 3)
    assert abs(torch.cat(blur_channels).double().mean() - 0.5) < 0.05
    assert abs(torch.cat(lowres_channels).double().mean() - 0.5) < 0.05


def phantom(shape, n_labels=4, seed=0):
    "A smooth random label map with -1 in a corner (outside) and an image whose intensity is its label."
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n_labels, *[max(2, s // 10) for s in shape], generator=g)
    mode = 'trilinear' if len(shape) == 3 else 'bilinear'
    seg = torch.nn.functional.interpolate(coarse, size=list(shape), mode=mode).argmax(1, keepdim=True)
    seg = seg.to(torch.int16)
    seg[(slice(None), slice(None)) + tuple(slice(0, max(1, s // 5)) for s in shape)] = -1
    return seg


@pytest.mark.parametrize("kind", ['3d', 'dummy_2d', '2d'])
def test_labels_stay_aligned_with_the_image(kind):
    patch = {'3d': (20, 24, 22), 'dummy_2d': (6, 40, 36), '2d': (40, 44)}[kind]
    geometry = augmentation_geometry(patch)
    assert geometry['dummy_2d'] == (kind == 'dummy_2d')
    source = source_patch_size(patch, geometry['rotation'], geometry['dummy_2d'])
    seg = phantom(source).expand(12, -1, *[-1] * len(source)).clone()
    image = seg.clamp(min=0).float()
    spatial_only = {**{k: 0.0 for k in AUGMENTATION_P}, 'rotation': 1.0, 'scaling': 1.0, 'mirror': 0.5}
    g = torch.Generator().manual_seed(1)
    out, target, drawn = augment_batch(image, seg, patch, g, geometry['rotation'], geometry['dummy_2d'],
                                       mirrored_axes(patch), p=spatial_only)
    exact = (out - out.round()).abs() < 1e-4
    assert exact.float().mean() > 0.5
    assert (out.round().to(torch.int16) == target)[exact].float().mean() > 0.999
    # dummy 2D: the slice axis is neither rotated nor resampled, each output slice comes from its source slice
    if kind == 'dummy_2d':
        assert (drawn['spatial']['affine'][:, 0] == torch.tensor([1., 0, 0], dtype=torch.float64)).all()
    # and with every transform on, labels only take values they had (-1 became 0)
    _, target_all, _ = augment_batch(image, seg, patch, torch.Generator().manual_seed(2),
                                     geometry['rotation'], geometry['dummy_2d'], mirrored_axes(patch),
                                     p={k: 1.0 for k in AUGMENTATION_P})
    assert set(target_all.unique().tolist()) <= set(seg.unique().tolist()) - {-1} | {0}


def test_mirroring_moves_image_and_label_together():
    seg = phantom((10, 12, 14)).expand(16, -1, -1, -1, -1).clone()
    image = seg.float() * 3 + 1
    out, target, drawn = augment_batch(image, seg, (10, 12, 14), torch.Generator().manual_seed(0), 0.0,
                                       p={**{k: 0.0 for k in AUGMENTATION_P}, 'mirror': 0.5})
    assert drawn['mirror']['flips'].any() and not drawn['mirror']['flips'].all()
    torch.testing.assert_close(target, ((out - 1) / 3).round().to(torch.int16).clamp(min=0))


def test_masked_channels_are_zero_outside():
    seg = phantom((12, 14, 16)).expand(4, -1, -1, -1, -1).clone()
    image = torch.randn(4, 2, 12, 14, 16) + 5
    out, _, _ = augment_batch(image, seg, (12, 14, 16), torch.Generator().manual_seed(0), 0.0,
                              mask_channels=[1], p={k: 0.0 for k in AUGMENTATION_P})
    outside = (seg < 0).expand(-1, 1, -1, -1, -1)
    assert (out[:, 1:][outside] == 0).all() and (out[:, :1][outside] != 0).all()


def write_case(folder, case_id, image, label, classes):
    locs = sample_class_locations(label[0], classes)
    save_case(folder, case_id, image, label, {'class_locations': locs})


@pytest.fixture(scope='module')
def sparse_folder(tmp_path_factory):
    "Preprocessed cases with one small lesion each in a large volume: random patches rarely see it."
    folder = tmp_path_factory.mktemp('sparse') / '3d_fullres'
    rng = np.random.default_rng(0)
    for i in range(4):
        label = np.zeros((1, 48, 64, 64), np.int16)
        z, y, x = rng.integers(6, 42), rng.integers(6, 58), rng.integers(6, 58)
        label[0, z - 2:z + 3, y - 2:y + 3, x - 2:x + 3] = 1
        image = rng.normal(size=(1, 48, 64, 64)).astype(np.float32) + label
        write_case(folder, f'case_{i}', image, label, [1])
    return folder


def sparse_settings(batch_size=3):
    patch = [16, 20, 20]
    g = augmentation_geometry(patch)
    return {'patch_size': patch, 'source_patch_size': source_patch_size(patch, g['rotation'], g['dummy_2d']),
            'batch_size': batch_size, **g, 'mirror_axes': mirrored_axes(patch), 'mask_channels': [],
            'ds_scales': [[1, 1, 1], [.5, .5, .5]], 'regions': None}


def test_augmented_batches_keep_a_third_foreground(sparse_folder):
    batches = TrainingBatches(PreprocessedDataset(sparse_folder), sparse_settings(3), seed=0)
    try:
        seen = np.array([[(b['target'][0][i] > 0).any().item() for i in range(3)]
                         for b in (next(batches) for _ in range(60))])
    finally:
        batches.close()
    assert seen[:, 2].all()               # the forced sample (the last of 3) shows the lesion, augmented too
    assert seen.mean() >= 0.33
    assert seen[:, :2].mean() < 0.3       # the others are random: the lesion is small


def test_same_seed_same_batches_whatever_the_threads(sparse_folder):
    def take(seed, threads, n=5):
        batches = TrainingBatches(PreprocessedDataset(sparse_folder), sparse_settings(2), seed=seed,
                                  threads=threads)
        try:
            return [next(batches) for _ in range(n)]
        finally:
            batches.close()
    a, b, c = take(7, 1), take(7, 3), take(8, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x['data'], y['data'], rtol=0, atol=0)
        for t, u in zip(x['target'], y['target']): torch.testing.assert_close(t, u, rtol=0, atol=0)
        assert x['keys'] == y['keys'] and applied_transforms(x['drawn']) == applied_transforms(y['drawn'])
    assert not all(torch.equal(x['data'], z['data']) for x, z in zip(a, c))


def test_validation_batches_are_final_size_without_augmentation(sparse_folder):
    settings = sparse_settings(2)
    val = TrainingBatches(PreprocessedDataset(sparse_folder), settings, augment=False, seed=0)
    try:
        batch = next(val)
    finally:
        val.close()
    assert tuple(batch['data'].shape) == (2, 1, 16, 20, 20) and batch['drawn'] is None
    assert [tuple(t.shape) for t in batch['target']] == [(2, 1, 16, 20, 20), (2, 1, 8, 10, 10)]
    assert batch['target'][0].min() >= 0


def test_pipeline_settings_from_plans(datasets, tmp_path):
    # the channels normalised within the image's non-zero mask: both of the cropped MR's, never CT's
    masked = {'mr': [0, 1], 'ct_aniso': [], 'ct2d': []}
    mirrored = {'2d': (0, 1), '3d_fullres': (0, 1, 2)}   # every spatial axis of the patch
    for kind in ('mr', 'ct_aniso', 'ct2d'):
        raw = datasets[kind]
        dataset_json = json.loads((raw / 'dataset.json').read_text())
        plans = plan_experiment(extract_fingerprint(raw, progress=False), dataset_json)
        for name, cfg in plans['configurations'].items():
            if 'patch_size' not in cfg: continue
            s = pipeline_settings(Configuration.from_plans(plans, name, dataset_json), dataset_json)
            assert s['patch_size'] == cfg['patch_size'] and s['batch_size'] == cfg['batch_size']
            assert len(s['ds_scales']) == len(cfg['architecture']['arch_kwargs']['strides']) - 1
            assert s['ds_scales'][0] == [1.0] * len(cfg['patch_size'])
            assert s['mask_channels'] == masked[kind], (kind, name)
            assert s['mirror_axes'] == mirrored[name], (kind, name)
        if kind == 'mr':   # a few augmented batches of the real preprocessed data (2 channels, masking)
            folder = preprocess_dataset(raw, plans, '3d_fullres', tmp_path / 'pp', progress=False)
            s = pipeline_settings(Configuration.from_plans(plans, '3d_fullres', dataset_json), dataset_json)
            batches = TrainingBatches(PreprocessedDataset(folder), s, seed=0)
            try:
                for _ in range(3):
                    b = next(batches)
                    assert tuple(b['data'].shape) == (s['batch_size'], 2, *s['patch_size'])
                    assert torch.isfinite(b['data']).all()
            finally:
                batches.close()


def test_training_regions():
    assert training_regions({'labels': {'background': 0, 'a': 1, 'b': 2}}) is None
    regions = training_regions({'labels': {'background': 0, 'whole': [1, 2, 3], 'core': [2, 3],
                                           'enhancing': 3}})
    assert regions == [(1, 2, 3), (2, 3), (3,)]
    with_ignore = training_regions({'labels': {'background': 0, 'whole': [1, 2], 'core': 2, 'ignore': 3}})
    assert with_ignore == [(1, 2), (2,), (3,)]
