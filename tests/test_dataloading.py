"""Patch sampling statistics measured over many draws."""
import numpy as np

from nnunet_lite.dataloading import box_around, foreground_box, random_box, start_bounds


def test_foreground_class_is_chosen_uniformly_not_by_size():
    rng = np.random.default_rng(0)
    big = np.argwhere(np.ones((10, 10, 10), bool)) + 20      # 1000 voxels of class 1
    locations = {1: big, 2: np.array([[80, 80, 80]]), 3: np.zeros((0, 3), int)}
    starts = [foreground_box((100, 100, 100), (20, 20, 20), (20, 20, 20), locations, rng)
              for _ in range(4000)]
    share_2 = np.mean([s == [70, 70, 70] for s in starts])
    assert 0.47 < share_2 < 0.53                                # two classes present: each half of the time


def test_random_starts_are_uniform_over_the_bounds():
    rng = np.random.default_rng(0)
    (lo, hi), = start_bounds([50], [30], [20])
    starts = np.array([random_box([50], [30], [20], rng)[0] for _ in range(20000)])
    counts = np.bincount(starts - lo, minlength=hi - lo + 1)
    assert len(counts) == hi - lo + 1
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_annotated_key_is_only_used_alone():
    rng = np.random.default_rng(0)
    annotated = (-1, 0, 1)
    both = {1: np.array([[5, 5, 5]]), annotated: np.array([[90, 90, 90]])}
    assert all(foreground_box((100,) * 3, (10,) * 3, (10,) * 3, both, rng) == [0, 0, 0] for _ in range(50))
    alone = {1: np.zeros((0, 3), int), annotated: np.array([[90, 90, 90]])}
    assert foreground_box((100,) * 3, (10,) * 3, (10,) * 3, alone, rng) == [85, 85, 85]
    assert box_around((100,) * 3, (10,) * 3, (10,) * 3, alone[annotated], rng) == [85, 85, 85]
