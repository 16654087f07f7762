"""Patch sampling rules against nnU-Net v2's trainer and data loader (nnUNetTrainer, nnUNetDataLoader)."""
import math
import types

import numpy as np
import pytest

from nnunet_lite.dataloading import (augmentation_geometry, forced_foreground, foreground_box,
                                     source_patch_size, start_bounds)
from nnunet_lite.plans import mirrored_axes

from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

PATCHES = [(128, 128, 128), (64, 160, 160), (80, 192, 160), (20, 256, 224), (28, 256, 256), (40, 56, 40),
           (16, 48, 160), (512, 512), (512, 256), (56, 40), (64, 96), (96, 64), (1024, 32)]


@pytest.mark.parametrize("patch", PATCHES, ids=str)
def test_rotation_dummy_2d_mirroring_and_source_patch_equal_the_trainer(patch):
    fake = types.SimpleNamespace(configuration_manager=types.SimpleNamespace(patch_size=list(patch)),
                                 print_to_log_file=lambda *a, **k: None)
    configure = nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    rot, dummy_2d, initial, mirror = configure(fake)
    ours = augmentation_geometry(patch)
    assert ours["dummy_2d"] == dummy_2d
    assert math.isclose(ours["rotation"], max(abs(r) for r in rot))
    assert mirrored_axes(patch) == tuple(mirror)
    assert source_patch_size(patch, ours["rotation"], ours["dummy_2d"]) == [int(i) for i in initial]


@pytest.mark.parametrize("batch_size", range(1, 25))
def test_forced_positions_equal_the_loader(batch_size):
    fake = types.SimpleNamespace(batch_size=batch_size, oversample_foreground_percent=0.33)
    expected = [nnUNetDataLoader._oversample_last_XX_percent(fake, j) for j in range(batch_size)]
    assert forced_foreground(batch_size) == expected


def _reference_loader(patch, final):
    fake = types.SimpleNamespace(patch_size=np.array(patch),
                                 need_to_pad=(np.array(patch) - np.array(final)).astype(int),
                                 has_ignore=False, annotated_classes_key=(-1, 0, 1))
    return fake


@pytest.mark.parametrize("shape,patch,final", [((100, 120, 90), (80, 96, 96), (64, 80, 80)),
                                               ((10, 300, 40), (16, 64, 64), (16, 48, 48)),
                                               ((30, 30, 30), (41, 41, 41), (32, 32, 32)),
                                               ((5, 7, 9), (8, 8, 8), (8, 8, 8)),
                                               ((1, 200, 180), (1, 160, 192), (1, 160, 192))])
def test_random_box_bounds_equal_get_bbox(monkeypatch, shape, patch, final):
    seen = []
    monkeypatch.setattr(np.random, "randint", lambda lo, hi: seen.append((lo, hi - 1)) or lo)
    nnUNetDataLoader.get_bbox(_reference_loader(patch, final), np.array(shape), False, None)
    assert start_bounds(shape, patch, final) == seen


@pytest.mark.parametrize("voxel", [(50, 5, 95), (0, 0, 0), (99, 99, 99), (3, 60, 40)])
def test_foreground_box_equals_get_bbox(voxel):
    shape, patch, final = (100, 100, 100), (40, 48, 56), (32, 40, 48)
    locations = {1: np.array([voxel])}
    reference = nnUNetDataLoader.get_bbox(_reference_loader(patch, final), np.array(shape), True,
                                          {1: np.array([[0, *voxel]])})[0]
    ours = foreground_box(shape, patch, final, locations, np.random.default_rng(0))
    assert ours == [int(i) for i in reference]
