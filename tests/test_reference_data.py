"""Conformance of nnunet_lite.data with the reference package nnunetv2: its readers, file listing and
integrity check."""

import numpy as np
import pytest

from nnunet_lite.data import (check_dataset, read_dataset_json, read_image, read_label, training_cases,
                              write_label)

from reference_oracle import require_reference  # noqa: E402
nnunetv2 = require_reference()
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity  # noqa: E402
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json  # noqa: E402
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets  # noqa: E402

KINDS = ["ct", "mr", "ct_aniso", "mr_aniso", "ct2d", "mr2d"]


def reference_reader(ds):
    d = read_dataset_json(ds)
    first = next(iter(training_cases(ds).values()))["images"][0]
    return determine_reader_writer_from_dataset_json(d, str(first), verbose=False)()


@pytest.mark.parametrize("kind", KINDS)
def test_case_listing_equals_reference(datasets, kind):
    ds = datasets[kind]
    ours = {k: {"images": [str(p) for p in v["images"]], "label": str(v["label"])}
            for k, v in training_cases(ds).items()}
    theirs = get_filenames_of_train_images_and_targets(str(ds), read_dataset_json(ds))
    theirs = {str(k): {"images": [str(p) for p in v["images"]], "label": str(v["label"])}
              for k, v in theirs.items()}
    assert ours == theirs


@pytest.mark.parametrize("kind", KINDS)
def test_arrays_and_spacing_equal_reference_reader(datasets, kind):
    ds = datasets[kind]
    reader = reference_reader(ds)
    for case in training_cases(ds).values():
        img, geo = read_image(case["images"])
        ref_img, ref_props = reader.read_images([str(p) for p in case["images"]])
        assert img.dtype == ref_img.dtype == np.float32
        assert img.shape == ref_img.shape
        assert np.array_equal(img, ref_img)
        assert np.allclose(geo.spacing, ref_props["spacing"], rtol=1e-6)
        lab, _ = read_label(case["label"])
        ref_seg, _ = reader.read_seg(str(case["label"]))
        assert ref_seg.shape == (1, *lab.shape) and np.array_equal(lab, ref_seg[0])
        if "sitk_stuff" in ref_props:   # the world geometry the reference keeps, in SimpleITK's order
            assert np.allclose(geo.origin, ref_props["sitk_stuff"]["origin"])
            assert np.allclose(geo.direction, ref_props["sitk_stuff"]["direction"])


@pytest.mark.parametrize("kind", ["mr", "ct_aniso", "mr2d"])
def test_reference_integrity_check_accepts_our_datasets(datasets, kind):
    verify_dataset_integrity(str(datasets[kind]), num_processes=1)  # raises on any problem


def test_reference_and_ours_both_refuse_an_undeclared_label(dataset_copy):
    ds = dataset_copy("ct")
    lab, geo = read_label(ds / "labelsTr" / "case_001.nii.gz")
    write_label(np.where(lab == 1, 5, lab), geo, ds / "labelsTr" / "case_001.nii.gz")
    with pytest.raises(RuntimeError):
        verify_dataset_integrity(str(ds), num_processes=1)
    assert any("label values [5]" in str(p) for p in check_dataset(ds, progress=False))


def test_reference_and_ours_both_refuse_a_shape_mismatch(dataset_copy):
    ds = dataset_copy("mr")
    lab, geo = read_label(ds / "labelsTr" / "case_002.nii.gz")
    write_label(lab[:-1], geo, ds / "labelsTr" / "case_002.nii.gz")
    with pytest.raises(RuntimeError):
        verify_dataset_integrity(str(ds), num_processes=1)
    assert any("case_002.nii.gz: shape" in str(p) for p in check_dataset(ds, progress=False))
