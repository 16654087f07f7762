"""Deterministic parts of the augmentation against batchgeneratorsv2 (the reference's transform library)."""
import pytest
import torch

from nnunet_lite.augmentation import blur_along, gaussian_kernels

from reference_oracle import require_reference  # noqa: E402
require_reference()
from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension  # noqa: E402


@pytest.mark.parametrize("sigma", [0.5, 0.58, 0.6, 0.75, 0.91, 0.95, 1.0])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blur_equals_reference(sigma, axis):
    img = torch.randn(1, 7, 10, 13, generator=torch.Generator().manual_seed(0))
    ref = blur_dimension(img, sigma, axis, force_use_fft=False)
    ours = blur_along(img[None], gaussian_kernels(torch.tensor([[sigma]])), axis + 2)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# spatial transform: our grid, image and labels against batchgeneratorsv2's SpatialTransform, same affine
# ------------------------------------------------------------------------------------------------------------
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from batchgeneratorsv2.transforms.spatial.spatial import (  # noqa: E402
    SpatialTransform, _convert_my_grid_to_grid_sample_grid)
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (  # noqa: E402
    DownsampleSegForDSTransform)
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.seg_to_regions import (  # noqa: E402
    ConvertSegmentationToRegionsTransform)

from nnunet_lite.augmentation import (  # noqa: E402
    affine_sampling_grid, deep_supervision_scales, deep_supervision_targets, draw_affines, labels_to_regions,
    mask_outside, remove_outside_label, resample_labels_linear, spatial_transform)


def reference_spatial(image, seg, affine, patch_size):
    "batchgeneratorsv2's SpatialTransform as nnU-Net sets it up, applied with a given affine (its grid code)."
    st = SpatialTransform(patch_size, 0, False, p_elastic_deform=0, p_rotation=0.2, rotation=(-1, 1),
                          p_scaling=0.2, scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
                          bg_style_seg_sampling=False, border_mode_seg='constant', padding_value_seg=-1)
    shape = image.shape[1:]
    centre = [s / 2 for s in shape]
    grid = torch.matmul(st._get_base_grid_clone(), torch.from_numpy(affine.T).float())
    grid += torch.Tensor([c - s / 2 for c, s in zip(centre, shape)])
    params = {'center_location_in_pixels': centre, 'grid': _convert_my_grid_to_grid_sample_grid(grid, shape),
              'affine': affine, 'elastic_offsets': None}
    return st._apply_to_image(image, **params), st._apply_to_segmentation(seg, **params), params['grid']


def blob_labels(shape, n_labels, seed):
    "Smooth random label maps (regions, not noise), -1 in one corner block as the outside."
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(1, n_labels, *[max(2, s // 4) for s in shape], generator=g)
    field = F.interpolate(field, size=list(shape), mode='bilinear' if len(shape) == 2 else 'trilinear',
                          align_corners=False)
    seg = field.argmax(1).to(torch.int16)
    seg[(slice(None),) + tuple(slice(0, s // 4) for s in shape)] = -1
    return seg


GEOMETRIES = [((40, 44, 36), (24, 28, 20), 3), ((19, 50, 47), (19, 32, 30), 2), ((60, 52), (40, 36), 2)]


@pytest.mark.parametrize("source,patch,dummy", [(s, p, d == 2 and len(s) == 3) for s, p, d in GEOMETRIES])
@pytest.mark.parametrize("seed", range(4))
def test_spatial_transform_equals_reference(source, patch, dummy, seed):
    ndim = len(source)
    gen = torch.Generator().manual_seed(seed)
    drawn = draw_affines(1, ndim, gen, math.pi if dummy or ndim == 2 else math.radians(30), dummy_2d=dummy,
                         p_rotation=1.0, p_scaling=1.0)
    affine = drawn['affine'][0].numpy()
    seg = blob_labels(source, 4, seed)
    image = seg.float() + 0.1 * torch.randn(seg.shape, generator=gen)
    ref_image, ref_seg, ref_grid = reference_spatial(image, seg, affine, patch)
    grid = affine_sampling_grid(drawn['affine'], source, patch)
    torch.testing.assert_close(grid[0], ref_grid, atol=2e-5, rtol=0)
    ours_image = F.grid_sample(image[None], grid, mode='bilinear', padding_mode='zeros',
                               align_corners=False)[0]
    torch.testing.assert_close(ours_image, ref_image, atol=1e-4, rtol=0)
    ours_seg = resample_labels_linear(seg[None], grid)[0]
    differ = (ours_seg != ref_seg)
    # the reference scores in float16 (x1000): labels whose scores differ by < ~1e-3 tie there, nearest wins
    assert differ.float().mean() < 2e-3, f"{differ.sum()} of {differ.numel()} labels differ"
    assert set(ours_seg.unique().tolist()) <= set(seg.unique().tolist()) | {-1}


@pytest.mark.parametrize("source,patch", [((31, 40, 33), (20, 24, 22)), ((40, 37), (24, 30))])
def test_centre_crop_equals_reference_crop(source, patch):
    "Without rotation or scaling the reference crops at floor(S/2) without interpolating, and so do we."
    seg = blob_labels(source, 3, 0)
    image = torch.randn(seg.shape)
    st = SpatialTransform(patch, 0, False, border_mode_seg='constant', padding_value_seg=-1)
    params = {'center_location_in_pixels': [s / 2 for s in source], 'grid': None, 'affine': None,
              'elastic_offsets': None}
    ours_image, ours_seg, _ = spatial_transform(image[None], seg[None], patch, torch.Generator(),
                                                rotation=1.0, p_rotation=0, p_scaling=0)
    torch.testing.assert_close(ours_image[0], st._apply_to_image(image, **params))
    torch.testing.assert_close(ours_seg[0], st._apply_to_segmentation(seg, **params))


def test_mask_remove_regions_and_ds_equal_reference():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(-1, 4, (1, 12, 14, 10), generator=g).to(torch.int16)
    image = torch.randn(3, 12, 14, 10, generator=g)
    ref = MaskImageTransform(apply_to_channels=[0, 2], channel_idx_in_seg=0, set_outside_to=0).apply(
        {'image': image.clone(), 'segmentation': seg.clone()})['image']
    torch.testing.assert_close(mask_outside(image[None], seg[None], [0, 2])[0], ref)
    ref_seg = RemoveLabelTransform(-1, 0).apply({'segmentation': seg.clone()})['segmentation']
    torch.testing.assert_close(remove_outside_label(seg[None])[0], ref_seg)
    regions = [(1, 2, 3), (2, 3), (3,)]
    to_regions = ConvertSegmentationToRegionsTransform(regions, 0)
    ref_regions = to_regions.apply({'segmentation': ref_seg.clone()})['segmentation']
    torch.testing.assert_close(labels_to_regions(ref_seg[None], regions)[0], ref_regions)
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 1], [1, 2, 2]]
    scales = deep_supervision_scales(strides)
    np.testing.assert_allclose(scales, list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1])
    for target in (ref_seg, ref_regions):
        ref_ds = DownsampleSegForDSTransform(scales).apply({'segmentation': target.clone()})['segmentation']
        ours = deep_supervision_targets(target[None], scales)
        assert len(ours) == len(ref_ds)
        for a, b in zip(ours, ref_ds):
            torch.testing.assert_close(a[0], b)
