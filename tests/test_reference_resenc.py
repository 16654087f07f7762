"""The residual-encoder presets against the reference: plans from `resenc_m/l/xl` equal nnU-Net v2's
nnUNetPlannerResEncM/L/XL on fingerprints of several geometries, the VRAM estimate equals
dynamic_network_architectures' ResidualEncoderUNet.compute_conv_feature_map_size, and the network built
from such a plan has the reference network's parameters, computes its outputs with its weights, and gives
it ours."""
import json

import numpy as np
import pytest
import torch

from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.network import (build_network, count_parameters, load_reference_weights, n_outputs,
                                 reference_state_dict)
from nnunet_lite.plans import (PRESETS, Configuration, features_per_stage, plan_experiment,
                               pool_and_conv_props, residual_feature_map_size)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from reference_oracle import make_fingerprint, reference_plans  # noqa: E402
from test_reference_plans import FINGERPRINTS, _normalise  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

PLANNERS = {'resenc_m': 'nnUNetPlannerResEncM', 'resenc_l': 'nnUNetPlannerResEncL',
            'resenc_xl': 'nnUNetPlannerResEncXL'}
# isotropic, anisotropic (z coarse; last axis coarse), 4 channels, small, large with a cascade, 2D (one
# natural image format), and a tiny dataset where the batch cap would have bitten under v2's 5 % rule
GEOMETRIES = ('iso_ct_medium', 'iso_mr_small_4ch', 'aniso_mr_prostate', 'aniso_last_axis', 'large_ct_lowres',
              'huge_iso_lowres', '2d_png_rgb', '2d_microscopy_norm', 'tiny_dataset')
# every geometry with M; L and XL (the same rules, other numbers) on one of each kind, to keep the run short
CASES = [(g, 'resenc_m') for g in GEOMETRIES] + [
    (g, p) for p in ('resenc_l', 'resenc_xl') for g in ('iso_ct_medium', 'aniso_mr_prostate',
                                                        'large_ct_lowres', '2d_png_rgb')]
COMPARED = ('spacing', 'patch_size', 'batch_size', 'median_image_size_in_voxels', 'normalization_schemes',
            'use_mask_for_norm', 'batch_dice', 'data_identifier', 'next_stage')
ARCH = ('n_stages', 'features_per_stage', 'kernel_sizes', 'strides', 'n_blocks_per_stage',
        'n_conv_per_stage_decoder', 'conv_op', 'norm_op', 'conv_bias', 'norm_op_kwargs', 'nonlin')


def _fingerprint(name):
    spacings, shapes, channels, rel, _ = FINGERPRINTS[name]
    fingerprint, dataset_json = make_fingerprint(spacings, shapes, channel_names=channels,
                                                 median_relative_size_after_cropping=rel)
    if name.startswith('2d_png'): dataset_json['file_ending'] = '.png'
    return fingerprint, dataset_json


@pytest.mark.parametrize('name,preset', CASES)
def test_resenc_plans_equal_reference(name, preset):
    "The preset's own GPU (None: 8, 24, 40 GB) on both sides."
    fingerprint, dataset_json = _fingerprint(name)
    ref = reference_plans(fingerprint, dataset_json, gpu_memory_gb=None, planner=PLANNERS[preset])
    ours = plan_experiment(fingerprint, dataset_json, preset=preset)
    assert ours['plans_name'] == ref['plans_name']
    assert set(ours['configurations']) == set(ref['configurations']), name
    for cfg_name, ref_cfg in ref['configurations'].items():
        cfg = ours['configurations'][cfg_name]
        if 'patch_size' not in ref_cfg:
            assert cfg == ref_cfg
            continue
        for key in COMPARED:
            if key in ('spacing', 'median_image_size_in_voxels'):
                assert np.allclose(cfg[key], ref_cfg[key], rtol=1e-12, atol=0), (cfg_name, key)
            else:
                assert _normalise(cfg.get(key)) == _normalise(ref_cfg.get(key)), (cfg_name, key, cfg.get(key),
                                                                                   ref_cfg.get(key))
        assert cfg['architecture']['network_class_name'] == ref_cfg['architecture']['network_class_name']
        for key in ARCH:
            ours_arch, ref_arch = cfg['architecture']['arch_kwargs'], ref_cfg['architecture']['arch_kwargs']
            assert _normalise(ours_arch[key]) == _normalise(ref_arch[key]), (cfg_name, key)
        assert set(cfg['architecture']['arch_kwargs']) == set(ref_cfg['architecture']['arch_kwargs'])


def test_non_default_gpu_equals_reference():
    "resenc_m asked for 12 GB (the reference warns, then scales its budget the same way)."
    fingerprint, dataset_json = _fingerprint('iso_ct_medium')
    with pytest.warns(UserWarning):
        ref = reference_plans(fingerprint, dataset_json, gpu_memory_gb=12, planner='nnUNetPlannerResEncM')
    with pytest.warns(UserWarning, match='made for 8 GB'):
        ours = plan_experiment(fingerprint, dataset_json, 12, preset='resenc_m')
    for name in ('2d', '3d_fullres'):
        for key in ('patch_size', 'batch_size'):
            ours_value, ref_value = ours['configurations'][name][key], ref['configurations'][name][key]
            assert _normalise(ours_value) == _normalise(ref_value), (name, key)


@pytest.mark.parametrize("spacing,patch,n_classes", [
    ([1.0, 1.0, 1.0], [128, 128, 128], 3), ([5.0, 0.8, 0.8], [20, 256, 224], 2),
    ([3.0, 0.7, 0.7], [37, 190, 201], 5), ([0.8, 0.8], [512, 512], 4), ([1.0, 2.0], [300, 140], 2),
    ([2.5, 1.0, 1.0], [64, 160, 160], 14)])
def test_vram_estimate_equals_residual_encoder_unet(spacing, patch, n_classes):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    _, strides, kernels, patch, _ = pool_and_conv_props(spacing, patch)
    dim, n = len(spacing), len(strides)
    feats = features_per_stage(n, 32, 320 if dim == 3 else 512)
    blocks = PRESETS['resenc_m'].encoder_blocks[:n]
    net = ResidualEncoderUNet(1, n, feats, torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d, kernels, strides,
                              blocks, n_classes, [1] * (n - 1), conv_bias=True)
    expected = int(net.compute_conv_feature_map_size(patch))
    assert residual_feature_map_size(patch, strides, feats, n_classes, blocks, 1) == expected


def our_network(plans, configuration, dataset_json, deep_supervision=True, initialise=True):
    config = Configuration.from_plans(plans, configuration, dataset_json)
    return build_network(config, dataset_json, deep_supervision, initialise)


def reference_network(plans, configuration, dataset_json, deep_supervision=True):
    config = Configuration.from_plans(plans, configuration, dataset_json)
    arch = config.architecture
    return get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'],
                                  arch['_kw_requires_import'], config.input_channels, n_outputs(dataset_json),
                                  allow_init=True, deep_supervision=deep_supervision)


@pytest.fixture(scope='module')
def resenc_plans(datasets):
    "(tag, plans, configuration, dataset_json) for the small synthetic datasets under every ResEnc preset."
    out = []
    for kind in ('ct', 'mr', 'ct_aniso', 'ct2d'):
        dataset_json = json.loads((datasets[kind] / 'dataset.json').read_text())
        fp = extract_fingerprint(datasets[kind], progress=False)
        for preset in PLANNERS:
            plans = plan_experiment(fp, dataset_json, preset=preset)
            for name, cfg in plans['configurations'].items():
                if 'architecture' in cfg: out.append((f'{kind}-{preset}-{name}', plans, name, dataset_json))
    return out


def test_parameters_equal_reference(resenc_plans):
    assert len(resenc_plans) >= 8
    for tag, plans, name, dataset_json in resenc_plans:
        ours, theirs = our_network(plans, name, dataset_json), reference_network(plans, name, dataset_json)
        assert type(theirs).__name__ == 'ResidualEncoderUNet', tag
        assert count_parameters(ours) == count_parameters(theirs), tag
        assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()], tag
        # initialised alike: every residual block's last norm at zero
        def zero_norms(state_dict):
            return sorted(k for k, v in state_dict.items() if '.conv2.norm.weight' in k and not v.any())
        ours_zero, theirs_zero = zero_norms(reference_state_dict(ours)), zero_norms(theirs.state_dict())
        assert ours_zero == theirs_zero and ours_zero, tag


@pytest.mark.parametrize('deep_supervision', [True, False])
def test_same_weights_same_outputs(resenc_plans, deep_supervision):
    "The reference's (randomised) weights loaded into ours: the same outputs for a fixed input, 3D and 2D."
    torch.manual_seed(0)
    chosen = ('ct_aniso-resenc_m-3d_fullres', 'ct2d-resenc_l-2d')
    for tag, plans, name, dataset_json in [p for p in resenc_plans if p[0].startswith(chosen)]:
        theirs = reference_network(plans, name, dataset_json, deep_supervision).eval()
        with torch.no_grad():       # move the zero-initialised norms away from zero so every path counts
            for p in theirs.parameters(): p.add_(0.1 * torch.randn_like(p))
        ours = our_network(plans, name, dataset_json, deep_supervision, initialise=False)
        ours = load_reference_weights(ours, theirs.state_dict()).eval()
        x = torch.randn(2, len(dataset_json['channel_names']), *plans['configurations'][name]['patch_size'])
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        a, b = (a, b) if deep_supervision else ([a], [b])
        assert len(a) == len(b), tag
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_reference_network_loads_our_weights_strictly(resenc_plans):
    "reference_state_dict: ResidualEncoderUNet loads it strictly (aliases, decoder.encoder) and agrees."
    chosen = [p for p in resenc_plans if p[0].endswith(('3d_fullres', '2d'))][:4]
    for tag, plans, name, dataset_json in chosen:
        ours = our_network(plans, name, dataset_json).eval()
        with torch.no_grad():
            for p in ours.parameters(): p.add_(0.1 * torch.randn_like(p))
        theirs = reference_network(plans, name, dataset_json).eval()
        theirs.load_state_dict(reference_state_dict(ours), strict=True)
        x = torch.randn(1, len(dataset_json['channel_names']), *plans['configurations'][name]['patch_size'])
        with torch.no_grad():
            for u, v in zip(ours(x), theirs(x)): torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_cascade_stage_of_a_resenc_plan():
    "A large CT: 3d_cascade_fullres builds a residual encoder whose stem takes CT + one-hot; theirs loads it."
    fingerprint, dataset_json = _fingerprint('large_ct_lowres')
    plans = plan_experiment(fingerprint, dataset_json, preset='resenc_m')
    assert plans['configurations']['3d_lowres']['data_identifier'] == 'nnUNetResEncUNetMPlans_3d_lowres'
    net = our_network(plans, '3d_cascade_fullres', dataset_json)
    assert net.stem[0].in_channels == 1 + (len(dataset_json['labels']) - 1)
    theirs = reference_network(plans, '3d_cascade_fullres', dataset_json)
    theirs.load_state_dict(reference_state_dict(net), strict=True)
