"""Conformance of nnunet_lite.plans with nnU-Net v2's ExperimentPlanner, and of the VRAM estimate with
dynamic_network_architectures' PlainConvUNet, over many fingerprints."""
import numpy as np
import pytest

from nnunet_lite.plans import (conv_feature_map_size, features_per_stage, plan_experiment,
                               pool_and_conv_props)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from reference_oracle import make_fingerprint, reference_plans  # noqa: E402


def _jitter(base, n, rel, seed):
    "n per-case values around `base`, each axis scaled by U(1-rel, 1+rel) (deterministic)."
    rng = np.random.default_rng(seed)
    return [[float(b) * rng.uniform(1 - rel, 1 + rel) for b in base] for _ in range(n)]


def _ishape(base, n, rel, seed):
    return [[max(1, int(round(v))) for v in row] for row in _jitter(base, n, rel, seed)]


# name: (spacings, shapes, channel names, median relative size after cropping, gpu GB): isotropic and
# anisotropic (coarse first or last axis), small and large enough for a 3d_lowres stage, 1 to 4 channels,
# CT and MR, 2D.
FINGERPRINTS = {
    "iso_ct_medium":        (_jitter([1.0, 1.0, 1.0], 20, 0.1, 0), _ishape([128, 256, 256], 20, 0.15, 1),
                             ("CT",), 1.0, 8),
    "iso_mr_small_4ch":     (_jitter([1.0, 1.0, 1.0], 30, 0.0, 0), _ishape([138, 169, 138], 30, 0.1, 2),
                             ("FLAIR", "T1", "T1c", "T2"), 0.4, 8),
    "aniso_ct_5mm":         (_jitter([5.0, 0.8, 0.8], 25, 0.2, 3), _ishape([40, 512, 512], 25, 0.2, 4),
                             ("CT",), 1.0, 8),
    "aniso_mr_prostate":    (_jitter([3.6, 0.62, 0.62], 32, 0.1, 5), _ishape([20, 320, 320], 32, 0.1, 6),
                             ("T2", "ADC"), 0.9, 8),
    "aniso_mr_acdc_10mm":   (_jitter([10.0, 1.5, 1.5], 100, 0.3, 7), _ishape([9, 237, 208], 100, 0.2, 8),
                             ("cineMRI",), 0.8, 8),
    "aniso_last_axis":      (_jitter([0.7, 0.7, 2.5], 15, 0.05, 9), _ishape([300, 300, 60], 15, 0.1, 10),
                             ("MR",), 0.6, 8),
    "large_ct_lowres":      (_jitter([1.0, 0.8, 0.8], 40, 0.1, 11), _ishape([400, 512, 512], 40, 0.1, 12),
                             ("CT",), 1.0, 8),
    "huge_iso_lowres":      ([[1.0, 1.0, 1.0]] * 20, [[500, 500, 500]] * 20, ("CT",), 1.0, 8),
    "large_mr_3ch_lowres":  (_jitter([1.5, 0.9, 0.9], 12, 0.1, 13), _ishape([250, 400, 400], 12, 0.1, 14),
                             ("T1", "T2", "PD"), 0.7, 8),
    "tiny_dataset":         (_jitter([1.0, 1.0, 1.0], 4, 0.1, 15), _ishape([36, 50, 35], 4, 0.1, 16),
                             ("MR",), 0.5, 8),
    "small_gpu_4gb":        (_jitter([1.0, 0.8, 0.8], 20, 0.1, 17), _ishape([200, 300, 300], 20, 0.1, 18),
                             ("CT",), 1.0, 4),
    "big_gpu_24gb":         (_jitter([1.0, 0.8, 0.8], 20, 0.1, 19), _ishape([200, 300, 300], 20, 0.1, 20),
                             ("CT",), 1.0, 24),
    "even_cases_half_voxel":([[1.0, 1.0, 1.0]] * 2 + [[1.0, 1.0, 1.0]] * 2,
                             [[61, 80, 81], [62, 81, 80], [60, 80, 80], [63, 82, 83]], ("MR",), 0.8, 8),
    "2d_png_rgb":           ([[999.0, 1.0, 1.0]] * 50, _ishape([1, 512, 512], 50, 0.0, 21),
                             ("R", "G", "B"), 1.0, 8),
    "2d_nifti_ct":          ([[799.2, 0.8, 0.8]] * 30, [[1, 400, 380]] * 30, ("CT",), 1.0, 8),
    "2d_microscopy_norm":   ([[999.0, 0.5, 0.5]] * 80, _ishape([1, 1024, 1024], 80, 0.2, 22),
                             ("rescale_to_0_1",), 1.0, 8),
    "noNorm_and_zscore":    (_jitter([2.0, 1.0, 1.0], 10, 0.1, 23), _ishape([80, 160, 160], 10, 0.1, 24),
                             ("noNorm", "T1"), 0.6, 8),
}

COMPARED = ("spacing", "patch_size", "batch_size", "median_image_size_in_voxels", "normalization_schemes",
            "use_mask_for_norm", "batch_dice")
ARCH = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
        "n_conv_per_stage_decoder", "conv_op", "norm_op")


def _normalise(v):
    if isinstance(v, (list, tuple)): return [_normalise(x) for x in v]
    if isinstance(v, float) and v.is_integer(): return int(v)
    return v


@pytest.mark.parametrize("name", list(FINGERPRINTS))
def test_plans_equal_reference(name):
    spacings, shapes, channels, rel, gpu = FINGERPRINTS[name]
    fingerprint, dataset_json = make_fingerprint(spacings, shapes, channel_names=channels,
                                                 median_relative_size_after_cropping=rel)
    if name.startswith("2d_png"): dataset_json["file_ending"] = ".png"
    ref = reference_plans(fingerprint, dataset_json, gpu_memory_gb=gpu)
    ours = plan_experiment(fingerprint, dataset_json, gpu_memory_gb=gpu)
    assert set(ours["configurations"]) == set(ref["configurations"]), name
    for key in ("transpose_forward", "transpose_backward", "original_median_shape_after_transp",
                "image_reader_writer"):
        assert ours[key] == ref[key], key
    assert np.allclose(ours["original_median_spacing_after_transp"],
                       ref["original_median_spacing_after_transp"], rtol=1e-12)
    for cfg_name, ref_cfg in ref["configurations"].items():
        cfg = ours["configurations"][cfg_name]
        if "patch_size" not in ref_cfg:
            assert cfg == ref_cfg
            continue
        for key in COMPARED:
            if key == "spacing" or key == "median_image_size_in_voxels":
                close = np.allclose(cfg[key], ref_cfg[key], rtol=1e-12, atol=0)
                assert close, (cfg_name, key, cfg[key], ref_cfg[key])
            else:
                same = _normalise(cfg[key]) == _normalise(ref_cfg[key])
                assert same, (cfg_name, key, cfg[key], ref_cfg[key])
        arch, ref_arch = cfg["architecture"]["arch_kwargs"], ref_cfg["architecture"]["arch_kwargs"]
        for key in ARCH:
            assert _normalise(arch[key]) == _normalise(ref_arch[key]), (cfg_name, key)
        for key in ("resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                    "resampling_fn_probabilities_kwargs", "next_stage"):
            assert cfg.get(key) == ref_cfg.get(key), (cfg_name, key)


@pytest.mark.parametrize("spacing,patch,n_classes", [
    ([1.0, 1.0, 1.0], [128, 128, 128], 3), ([5.0, 0.8, 0.8], [20, 256, 224], 2),
    ([3.0, 0.7, 0.7], [37, 190, 201], 5), ([0.8, 0.8], [512, 512], 4), ([1.0, 2.0], [300, 140], 2),
    ([2.5, 1.0, 1.0], [64, 160, 160], 14)])
def test_vram_estimate_equals_plainconvunet(spacing, patch, n_classes):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    import torch
    _, strides, kernels, patch, _ = pool_and_conv_props(spacing, patch)
    dim = len(spacing)
    feats = features_per_stage(len(strides), 32, 320 if dim == 3 else 512)
    net = PlainConvUNet(1, len(strides), feats, torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d, kernels,
                        strides, [2] * len(strides), n_classes, [2] * (len(strides) - 1), conv_bias=True)
    expected = int(net.compute_conv_feature_map_size(patch))
    assert conv_feature_map_size(patch, strides, feats, n_classes) == expected
