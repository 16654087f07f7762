"""Deterministic parts of the augmentation against batchgeneratorsv2 (the reference's transform library)."""
import pytest
import torch

from nnunet_lite.augmentation import blur_along, gaussian_kernels

pytest.importorskip("nnunetv2")
from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension  # noqa: E402


@pytest.mark.parametrize("sigma", [0.5, 0.58, 0.6, 0.75, 0.91, 0.95, 1.0])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blur_equals_reference(sigma, axis):
    img = torch.randn(1, 7, 10, 13, generator=torch.Generator().manual_seed(0))
    ref = blur_dimension(img, sigma, axis, force_use_fft=False)
    ours = blur_along(img[None], gaussian_kernels(torch.tensor([[sigma]])), axis + 2)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
