"""Conformance of nnunet_lite.preprocessing with nnU-Net v2: `DefaultPreprocessor.run_case` on synthetic
datasets (CT and MR, isotropic, anisotropic and transposed, 3D and 2D, every configuration of their plans),
the default resampling functions, the foreground location sampling, and the export of predictions
(`convert_predicted_logits_to_segmentation_with_correct_shape`).

Images must agree to 1e-3 of the normalised intensity range (in practice ~1e-7), labels exactly."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_lite.data import make_synthetic_dataset, read_dataset_json, training_cases
from nnunet_lite.data import held_out_cases
from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.plans import Configuration, plan_experiment
from nnunet_lite.preprocessing import (load_preprocessed_case, preprocess_case, preprocess_dataset,
                                       resample_image, resample_label, revert, sample_class_locations)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.inference.export_prediction import \
    convert_predicted_logits_to_segmentation_with_correct_shape  # noqa: E402
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: E402
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402
from reference_oracle import reference_preprocess_case  # noqa: E402

IMAGE_RTOL = 1e-3   # max |ours - reference| as a fraction of the reference's intensity range
PROB_ATOL = 1e-4

# ------------------------------------------------------------------------------------------------------------
# synthetic datasets and their plans (made lazily, once per module)
# ------------------------------------------------------------------------------------------------------------

# name: (kind, SynthSpec overrides, GPU memory for the planner). Every dataset has 4 training cases and 1
# test case; with spacing jitter and 4 cases the median (target) spacing is nobody's own spacing, so every
# case is resampled.
DATASETS = {
    # the tiny GPU budget makes the planner shrink the fullres patch below 25 % of the image: a real 3d_lowres
    "ct": ("ct", dict(shape=(20, 32, 32), spacing_jitter=0.2), 0.002),
    "mr": ("mr", dict(shape=(20, 32, 32), spacing_jitter=0.2), 8),               # 2 channels, zero background
    "ct_aniso": ("ct_aniso", dict(shape=(8, 32, 32), spacing_jitter=0.2), 8),            # 5 x 0.8 x 0.8 mm
    # coarse x: transposed
    "mr_aniso_T": ("mr_aniso", dict(shape=(40, 40, 10), spacing=(0.8, 0.8, 5.0), spacing_jitter=0.2), 8),
    "ct2d": ("ct2d", dict(shape=(32, 32), spacing_jitter=0.2), 8),                       # 2D NIfTI
    "mr2d": ("mr2d", dict(shape=(32, 32)), 8),                                           # 2D .png
}
JITTERED = {"ct", "mr", "ct_aniso", "mr_aniso_T", "ct2d"}

CONFIGS = [("ct", "2d"), ("ct", "3d_fullres"), ("ct", "3d_lowres"), ("ct", "3d_cascade_fullres"),
           ("mr", "2d"), ("mr", "3d_fullres"),
           ("ct_aniso", "2d"), ("ct_aniso", "3d_fullres"),
           ("mr_aniso_T", "2d"), ("mr_aniso_T", "3d_fullres"),
           ("ct2d", "2d"), ("mr2d", "2d")]


class _Planned:
    "Datasets, plans and preprocessed cases, each made on first use."

    def __init__(self, root):
        self.root, self._datasets, self._results = root, {}, {}

    def dataset(self, name):
        "(folder, dataset_json, plans) of a synthetic dataset."
        if name not in self._datasets:
            kind, overrides, gpu = DATASETS[name]
            folder = make_synthetic_dataset(self.root / name, kind, workers=2, progress=False, n_train=4,
                                            n_test=1, **overrides)
            dataset_json = read_dataset_json(folder)
            plans = plan_experiment(extract_fingerprint(folder, progress=False), dataset_json,
                                    gpu_memory_gb=gpu)
            self._datasets[name] = folder, dataset_json, json.loads(json.dumps(plans))
        return self._datasets[name]

    def cases(self, name):
        "[(case_id, image files, label file or None)]: the training cases and the test case (no label)."
        folder, dataset_json, _ = self.dataset(name)
        return ([(k, v["images"], v["label"]) for k, v in training_cases(folder, dataset_json).items()]
                + [(k, files, None) for k, files in held_out_cases(folder, dataset_json).items()])

    def results(self, name, configuration):
        "[(case_id, has_label, ours (data, seg, props), reference (data, seg, props))] for every case."
        key = (name, configuration)
        if key not in self._results:
            _, dataset_json, plans = self.dataset(name)
            assert configuration in plans["configurations"], f"{name}: plans lack {configuration}"
            self._results[key] = [
                (case_id, label is not None,
                 preprocess_case(images, label, Configuration.from_plans(plans, configuration, dataset_json),
                                 dataset_json),
                 reference_preprocess_case(images, label, plans, configuration, dataset_json))
                for case_id, images, label in self.cases(name)]
        return self._results[key]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return _Planned(tmp_path_factory.mktemp("preprocessing_conformance"))


def assert_image_close(ours, ref, what=""):
    assert ours.dtype == np.float32, what
    assert ours.shape == ref.shape, what
    scale = float(ref.max() - ref.min())
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert diff <= IMAGE_RTOL * max(scale, 1e-6), f"{what}: max |diff| {diff:.3g} for a range of {scale:.3g}"
    return diff / max(scale, 1e-6)


def assert_labels_equal(ours, ref, what=""):
    assert ours.shape == ref.shape, what
    assert ours.dtype == ref.dtype, f"{what}: {ours.dtype} vs {ref.dtype}"
    bad = ours != ref
    first = np.argwhere(bad)[:5].tolist()
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} voxels differ, first at {first}"


# ------------------------------------------------------------------------------------------------------------
# whole cases vs DefaultPreprocessor.run_case
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,configuration", CONFIGS, ids=[f"{n}-{c}" for n, c in CONFIGS])
def test_preprocess_case_equals_reference(planned, name, configuration):
    _, dataset_json, plans = planned.dataset(name)
    transpose_forward = plans["transpose_forward"]
    results = planned.results(name, configuration)
    assert sum(not has_label for _, has_label, _, _ in results) == 1   # the test case is included
    for case_id, has_label, (data, seg, props), (rdata, rseg, rprops) in results:
        what = f"{name} {configuration} {case_id}"
        assert_image_close(data, rdata, what)
        assert_labels_equal(seg, rseg, what)
        assert seg.ndim == 4 and seg.shape[0] == 1 and seg.shape[1:] == data.shape[1:]
        assert list(props["shape_before_cropping"]) == list(rprops["shape_before_cropping"]), what
        bbox, ref_bbox = props["bbox_used_for_cropping"], rprops["bbox_used_for_cropping"]
        assert [list(b) for b in bbox] == [list(b) for b in ref_bbox], what
        assert (list(props["shape_after_cropping_and_before_resampling"])
                == list(rprops["shape_after_cropping_and_before_resampling"])), what
        assert list(props["shape_after_resampling"]) == list(data.shape[1:]), what
        ref_spacing = [rprops["spacing"][a] for a in transpose_forward]
        assert props["spacing_before_resampling"] == pytest.approx(ref_spacing), what
        if name in JITTERED and case_id.startswith("case"):  # every training case is really resampled
            spacing_after = props["spacing_after_resampling"]
            assert props["spacing_before_resampling"] != pytest.approx(spacing_after), what
            shape_before = props["shape_after_cropping_and_before_resampling"]
            assert props["shape_after_resampling"] != shape_before, what
        if not has_label:
            assert "class_locations" not in props and "class_locations" not in rprops, what
            continue
        locations, rlocations = props["class_locations"], rprops["class_locations"]
        assert set(locations) == set(rlocations) == {1, 2, 3}, what
        for c, ref_loc in rlocations.items():
            ref_loc = np.asarray(ref_loc, np.int64).reshape(-1, 4)
            assert (ref_loc[:, 0] == 0).all()
            assert locations[c].shape == (len(ref_loc), 3), f"{what} class {c}"
            assert np.array_equal(locations[c], ref_loc[:, 1:]), f"{what} class {c}"
            assert (seg[0][tuple(locations[c].T)] == c).all(), f"{what} class {c}"


def test_datasets_cover_the_intended_cases(planned):
    "The plans have the features the conformance cases are meant to exercise."
    _, _, ct = planned.dataset("ct")
    assert {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"} <= set(ct["configurations"])
    assert ct["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    _, _, mr = planned.dataset("mr")
    assert mr["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"] * 2
    assert mr["configurations"]["3d_fullres"]["use_mask_for_norm"] == [True, True]
    _, _, aniso = planned.dataset("ct_aniso")
    assert aniso["transpose_forward"] == [0, 1, 2]
    sp = aniso["configurations"]["3d_fullres"]["spacing"]
    assert max(sp) / min(sp) > 3      # resampled with a separate z axis
    _, _, transposed = planned.dataset("mr_aniso_T")
    assert transposed["transpose_forward"] == [2, 0, 1]
    assert transposed["transpose_backward"] == [1, 2, 0]
    for name in ("ct2d", "mr2d"):
        assert set(planned.dataset(name)[2]["configurations"]) == {"2d"}
    assert planned.dataset("mr2d")[2]["image_reader_writer"] == "NaturalImage2DIO"


@pytest.mark.parametrize("name,configuration",
                         [("ct", "3d_fullres"), ("ct", "3d_lowres"), ("ct_aniso", "3d_fullres"),
                                                ("mr_aniso_T", "2d")])
def test_up_and_down_sampling_are_both_covered(planned, name, configuration):
    "Per axis, resampled over cropped size: 3d_lowres only shrinks, the others grow some axes, shrink others."
    ratios = np.array([np.divide(p["shape_after_resampling"], p["shape_after_cropping_and_before_resampling"])
                       for _, _, (_, _, p), _ in planned.results(name, configuration)])
    if configuration == "3d_lowres":
        assert (ratios < 1).all()
    else:
        assert (ratios > 1).any() and (ratios < 1).any()


def test_ct_normalisation_uses_the_fingerprint_statistics(planned):
    "Made-up statistics in the plans change our output exactly as they change the reference's."
    folder, dataset_json, plans = planned.dataset("ct")
    stats = {"mean": 150.0, "median": 140.0, "std": 250.0, "min": -900.0, "max": 1500.0,
             "percentile_99_5": 600.0, "percentile_00_5": -300.0}
    plans = {**plans, "foreground_intensity_properties_per_channel": {"0": stats}}
    case = next(iter(training_cases(folder, dataset_json).values()))
    config = Configuration.from_plans(plans, "3d_fullres", dataset_json)
    data, _, _ = preprocess_case(case["images"], case["label"], config, dataset_json)
    rdata, _, _ = reference_preprocess_case(case["images"], case["label"], plans, "3d_fullres", dataset_json)
    assert_image_close(data, rdata, "ct with made-up statistics")
    lo = (stats["percentile_00_5"] - stats["mean"]) / stats["std"]
    hi = (stats["percentile_99_5"] - stats["mean"]) / stats["std"]
    assert data.min() == pytest.approx(lo, abs=1e-5) and data.max() == pytest.approx(hi, abs=1e-5)
    normal, _, _ = planned.results("ct", "3d_fullres")[0][2]
    assert np.abs(normal - data).max() > 0.1   # the statistics matter


def test_preprocess_dataset_and_load_case_equal_reference(planned, tmp_path):
    "The saved and reloaded cases are what the reference computes (locations survive the round trip)."
    folder, dataset_json, plans = planned.dataset("mr_aniso_T")
    out = preprocess_dataset(folder, plans, "3d_fullres", tmp_path, workers=1, progress=False)
    cases = training_cases(folder, dataset_json)
    for case_id, v in cases.items():
        data, seg, props = load_preprocessed_case(out, case_id)
        rdata, rseg, rprops = reference_preprocess_case(v["images"], v["label"], plans, "3d_fullres",
                                                        dataset_json)
        assert_image_close(np.asarray(data), rdata, case_id)
        assert_labels_equal(np.asarray(seg), rseg, case_id)
        for c, ref_loc in rprops["class_locations"].items():
            ref_loc = np.asarray(ref_loc).reshape(-1, 4)[:, 1:]
            assert np.array_equal(props["class_locations"][c], ref_loc), (case_id, c)


# ------------------------------------------------------------------------------------------------------------
# resampling functions vs resample_data_or_seg_to_shape
# ------------------------------------------------------------------------------------------------------------

# (input shape, output shape, current spacing, new spacing, force_separate_z)
RESAMPLINGS = {
    "iso_up": ((10, 12, 14), (15, 19, 21), (1.0, 1.0, 1.0), (0.66, 0.63, 0.66), None),
    "iso_down": ((16, 20, 24), (9, 13, 15), (1.0, 1.0, 1.0), (1.8, 1.55, 1.6), None),
    "iso_mixed_one_axis_kept": ((12, 16, 20), (17, 11, 20), (1.0, 1.0, 1.0), (0.7, 1.45, 1.0), None),
    "exact_2x_up": ((8, 10, 12), (16, 20, 24), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), None),
    "exact_2x_down": ((16, 20, 24), (8, 10, 12), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), None),
    "sep_z0_up": ((6, 20, 20), (9, 26, 14), (5.0, 0.8, 0.8), (3.3, 0.6, 1.15), None),
    "sep_z0_exact_2x": ((6, 16, 16), (12, 8, 32), (5.0, 1.0, 1.0), (2.5, 2.0, 0.5), None),
    "sep_z2_down": ((20, 20, 6), (14, 25, 4), (0.8, 0.8, 5.0), (1.15, 0.64, 7.5), None),
    "sep_z1_from_new_spacing": ((12, 16, 12), (13, 4, 11), (1.0, 1.0, 1.0), (0.9, 4.0, 1.1), None),
    "sep_z0_forced": ((8, 14, 14), (12, 10, 17), (2.0, 1.0, 1.0), (1.33, 1.4, 0.82), True),
    "sep_z0_forced_off": ((6, 20, 20), (9, 26, 14), (5.0, 0.8, 0.8), (3.3, 0.6, 1.15), False),
    "two_coarse_axes_not_separate": ((6, 6, 20), (9, 8, 13), (4.0, 4.0, 1.0), (2.7, 3.0, 1.5), None),
    "2d_slice": ((1, 20, 24), (1, 31, 17), (999.0, 1.0, 1.0), (999.0, 0.65, 1.4), None),
}


def smooth_volume(shape, channels, seed):
    rng = np.random.default_rng(seed)
    x = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) for _ in range(channels)])
    return (x / x.std() * 100 + 40).astype(np.float32)


def label_map(shape, n_labels, seed, smooth=True, with_outside=False):
    "Smooth blobs (or i.i.d. noise) quantised into labels 0..n_labels-1; optionally -1 (outside) on one side."
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape)
    if not smooth:
        label = rng.integers(0, n_labels, size=shape)
    else:
        field = ndimage.gaussian_filter(noise, sigma=1.2)
        label = np.digitize(field, np.quantile(field, np.linspace(0, 1, n_labels + 1)[1:-1]))
    label = label.astype(np.int16)
    if with_outside:
        label[..., : max(1, shape[-1] // 4)] = -1
    return label


@pytest.mark.parametrize("order,order_z", [(3, 0), (1, 0), (3, 1)])
@pytest.mark.parametrize("case", list(RESAMPLINGS))
def test_resample_image_equals_reference(case, order, order_z):
    shape, new_shape, sp, new_sp, force = RESAMPLINGS[case]
    data = smooth_volume(shape, 2, seed=len(case))
    ours = resample_image(data, new_shape, sp, new_sp, order=order, order_z=order_z, force_separate_z=force)
    ref = resample_data_or_seg_to_shape(data, new_shape, sp, new_sp, is_seg=False, order=order,
                                        order_z=order_z, force_separate_z=force)
    assert ours.shape == (2, *new_shape)
    assert_image_close(ours, ref, case)
    # torch input gives the same numbers
    assert np.array_equal(resample_image(torch.from_numpy(data), new_shape, sp, new_sp, order=order,
                                         order_z=order_z, force_separate_z=force).numpy(), ours)


LABEL_MAPS = {"3_labels_smooth": (3, True, False), "5_labels_smooth": (5, True, False),
              "5_labels_noise": (5, False, False), "4_labels_noise_and_outside": (4, False, True),
              "6_labels_smooth_and_outside": (6, True, True)}


@pytest.mark.parametrize("order_z", [0, 1])
@pytest.mark.parametrize("labels", list(LABEL_MAPS))
@pytest.mark.parametrize("case", list(RESAMPLINGS))
def test_resample_label_equals_reference(case, labels, order_z):
    shape, new_shape, sp, new_sp, force = RESAMPLINGS[case]
    n, smooth, outside = LABEL_MAPS[labels]
    label = label_map(shape, n, seed=n + 7 * len(case), smooth=smooth, with_outside=outside)
    ours = resample_label(label, new_shape, sp, new_sp, order=1, order_z=order_z, force_separate_z=force)
    ref = resample_data_or_seg_to_shape(label[None], new_shape, sp, new_sp, is_seg=True, order=1,
                                        order_z=order_z, force_separate_z=force)[0]
    assert ours.dtype == label.dtype
    assert_labels_equal(ours, ref, f"{case} {labels}")


@pytest.mark.parametrize("new_shape", [(18, 21, 24), (9, 10, 12), (12, 14, 16), (4, 5, 5), (6, 21, 8)])
def test_resample_label_breaks_exact_ties_like_the_reference(new_shape):
    """Random noise labels at 3x, 1.5x, 2x, 2/3x: most voxels are boundaries and many scores tie exactly
    (e.g. 4/9 for two classes); the winner must be the reference's, voxel for voxel."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        label = rng.integers(0, 4, (6, 7, 8)).astype(np.int16)
        ref = resample_data_or_seg_to_shape(label[None], new_shape, (1, 1, 1), (1, 1, 1), is_seg=True,
                                            order=1, force_separate_z=False)[0]
        ours = resample_label(label, new_shape, (1, 1, 1), (1, 1, 1), force_separate_z=False)
        assert_labels_equal(ours, ref, str(new_shape))


def test_resample_label_keeps_a_single_label():
    label = np.full((6, 8, 8), 2, np.int16)
    ours = resample_label(label, (9, 5, 12), (1, 1, 1), (0.7, 1.6, 0.7))
    ref = resample_data_or_seg_to_shape(label[None], (9, 5, 12), (1, 1, 1), (0.7, 1.6, 0.7), is_seg=True,
                                        order=1)[0]
    assert_labels_equal(ours, ref)


# ------------------------------------------------------------------------------------------------------------
# foreground locations vs DefaultPreprocessor._sample_foreground_locations
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes,max_per_class", [
    ([1, 2, 3], 10_000),                       # all present, all kept
    ([1, 2, 3, 4], 10_000),                    # class 4 is absent
    ([1, 2, 3], 300),                          # capped at 300 voxels per class
    ([3, 1, 2], 50),                           # capped, and the 1 % coverage (>50) wins for big classes
    ([(1, 2, 3), (2, 3), 3], 10_000),          # regions
    ([(1, 2, 3), (2, 3), (3,), (4,)], 400),    # regions, capped, one absent
    ([1, 2, 3, (-1, 0, 1, 2, 3)], 500),        # the ignore label's 'all annotated voxels' class
])
def test_sample_class_locations_equals_reference(classes, max_per_class):
    label = label_map((18, 30, 32), 4, seed=3, with_outside=True)
    ours = sample_class_locations(label, classes, max_per_class=max_per_class)
    as_lists = [list(c) if isinstance(c, tuple) else c for c in classes]
    ref = DefaultPreprocessor._sample_foreground_locations(label[None], as_lists,
                                                           min_num_samples=max_per_class)
    assert list(ours) == list(ref)
    for c in ours:
        ref_loc = np.asarray(ref[c], np.int64).reshape(-1, 4)
        assert ours[c].shape == (len(ref_loc), 3), c
        assert np.array_equal(ours[c], ref_loc[:, 1:]), c
        members = c if isinstance(c, tuple) else (c,)
        total = int(np.isin(label, members).sum())
        expected = 0 if total == 0 else max(min(max_per_class, total), int(np.ceil(0.01 * total)))
        assert len(ours[c]) == expected


# ------------------------------------------------------------------------------------------------------------
# revert vs convert_predicted_logits_to_segmentation_with_correct_shape
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_revert_equals_reference_export(planned, configuration):
    "Random logits of an anisotropic, transposed (coarse last axis), cropped MR case back to the image grid."
    _, dataset_json, plans = planned.dataset("mr_aniso_T")
    plans_manager = PlansManager(json.loads(json.dumps(plans)))
    cfg_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    n_classes = len(dataset_json["labels"])
    rng = np.random.default_rng(0)
    mismatches = total = 0
    for case_id, has_label, (data, _, props), (_, _, rprops) in planned.results("mr_aniso_T", configuration):
        shape_before = rprops["shape_before_cropping"]
        cropped = [b - a for a, b in rprops["bbox_used_for_cropping"]]
        assert cropped != list(shape_before), "the case is not cropped"
        logits = (rng.normal(size=(n_classes, *data.shape[1:])) * 3).astype(np.float32)
        config = Configuration.from_plans(plans, configuration, dataset_json)
        seg, probs = revert(logits, props, config, return_probabilities=True)
        seg_only = revert(torch.from_numpy(logits), props, config)
        rseg, rprobs = convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(logits), plans_manager, cfg_manager, label_manager, dict(rprops),
            return_probabilities=True, num_threads_torch=1)
        rseg_logits = convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(logits), plans_manager, cfg_manager, label_manager, dict(rprops),
            num_threads_torch=1)
        original_shape = tuple(np.array(shape_before)[plans["transpose_backward"]])
        assert seg.shape == rseg.shape == original_shape and seg.dtype == rseg.dtype == np.uint8
        assert np.array_equal(seg, seg_only), case_id
        assert probs.shape == rprobs.shape == (n_classes, *original_shape) and probs.dtype == np.float32
        assert np.abs(probs - rprobs).max() <= PROB_ATOL, case_id
        # labels: identical except where the reference's top two probabilities (nearly) tie
        top2 = np.sort(rprobs, axis=0)[-2:]
        for ref_seg in (rseg, rseg_logits):
            bad = seg != ref_seg
            assert (top2[1][bad] - top2[0][bad] <= 1e-5).all(), case_id
            mismatches += int(bad.sum())
            total += bad.size
    assert mismatches <= 1e-3 * total
