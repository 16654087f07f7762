"""Preprocessing as scripts and the CLI use it: whole datasets, resuming, bad input and the
`nnlite preprocess` command."""
import json

import numpy as np
import pytest

from nnunet_lite.data import Geometry, read_dataset_json, read_label, training_cases, write_label
from nnunet_lite.data import held_out_cases
from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.plans import Configuration, plan_experiment, save_plans
from nnunet_lite.preprocessing import (DatasetError, case_is_done, label_to_logits, load_preprocessed_case,
                                       preprocess_case, preprocess_dataset, preprocessed_cases, revert)

from cli_runner import nnlite


def plans_for(ds):
    return plan_experiment(extract_fingerprint(ds, progress=False), read_dataset_json(ds))


def mtimes(folder, cases):
    return {p.name: p.stat().st_mtime_ns for c in cases for p in folder.glob(f"{c}*")}


@pytest.mark.parametrize("kind", ["mr", "ct_aniso", "ct2d"])
def test_dataset_round_trip_through_revert(datasets, tmp_path, kind):
    "Every case: preprocess, revert a perfect prediction, get the original label back (up to resampling)."
    ds = datasets[kind]
    plans = plans_for(ds)
    config = "2d" if kind == "ct2d" else "3d_fullres"
    folder = preprocess_dataset(ds, plans, config, tmp_path, progress=False)
    n_classes = len(read_dataset_json(ds)["labels"])
    for case, files in training_cases(ds).items():
        data, seg, props = load_preprocessed_case(folder, case)
        assert isinstance(data, np.memmap) and data.dtype == np.float32
        label, geometry = read_label(files["label"])
        logits = label_to_logits(np.asarray(seg), n_classes)
        back = revert(logits, props, Configuration.from_plans(plans, config))
        assert back.shape == label.shape
        assert np.mean(back == label) > 0.97, (case, np.mean(back == label))
        for c in range(1, n_classes):   # every class survives the round trip where it was present
            if (label == c).sum() > 20: assert (back == c).sum() > 0.5 * (label == c).sum()


def test_test_case_without_label(datasets):
    ds = datasets["mr"]
    plans = plans_for(ds)
    files = next(iter(held_out_cases(ds).values()))
    data, seg, props = preprocess_case(files, None, Configuration.from_plans(plans, "3d_fullres"))
    assert "class_locations" not in props
    assert set(np.unique(seg)) <= {-1, 0}           # only the body mask
    assert data.shape[1:] == seg.shape[1:]


def test_resume_redoes_only_unfinished_cases_and_clears_temporaries(dataset_copy, tmp_path):
    ds = dataset_copy("ct")
    plans = plans_for(ds)
    folder = preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    # a run killed while writing case_001: its JSON (written last) missing, a temporary left behind
    (folder / "case_001.json").unlink()
    (folder / ".case_001.npy.1234abcd.tmp").write_bytes(b"half a file")
    assert not case_is_done(folder, "case_001")
    kept = mtimes(folder, ["case_000", "case_002"])
    preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    assert mtimes(folder, ["case_000", "case_002"]) == kept
    assert case_is_done(folder, "case_001")
    assert not list(folder.glob(".*.tmp"))
    assert preprocessed_cases(folder) == ["case_000", "case_001", "case_002"]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_label_geometry_stops_with_its_name_and_keeps_written_cases(dataset_copy, tmp_path, workers):
    ds = dataset_copy("ct")
    plans = plans_for(ds)
    folder = preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    kept = mtimes(folder, ["case_000", "case_001"])
    bad = ds / "labelsTr" / "case_002.nii.gz"
    label, geometry = read_label(bad)
    shifted = Geometry(geometry.spacing, tuple(o + 5 for o in geometry.origin), geometry.direction)
    write_label(label, shifted, bad)
    (folder / "case_002.json").unlink()
    with pytest.raises(DatasetError, match=r"case_002\.nii\.gz: origin differ from image case_002_0000"):
        preprocess_dataset(ds, plans, "3d_fullres", tmp_path, workers=workers, progress=False)
    assert mtimes(folder, ["case_000", "case_001"]) == kept
    assert not case_is_done(folder, "case_002") and not list(folder.glob(".*.tmp"))


def test_unreadable_image_names_the_file(dataset_copy, tmp_path):
    ds = dataset_copy("mr")
    plans = plans_for(ds)
    (ds / "imagesTr" / "case_001_0001.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"case_001_0001\.nii\.gz: cannot be read"):
        preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    assert case_is_done(tmp_path / "3d_fullres", "case_000")


def test_other_plans_are_refused_unless_overwrite(datasets, tmp_path):
    ds = datasets["ct"]
    plans = plans_for(ds)
    preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    other = json.loads(json.dumps(plans))
    other["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    with pytest.raises(DatasetError, match="other plans"):
        preprocess_dataset(ds, other, "3d_fullres", tmp_path, progress=False)
    folder = preprocess_dataset(ds, other, "3d_fullres", tmp_path, progress=False, overwrite=True)
    assert load_preprocessed_case(folder, "case_000")[2]["spacing_after_resampling"] == [2.0, 2.0, 2.0]


def test_parallel_equals_serial(datasets, tmp_path):
    ds = datasets["mr_aniso"]
    plans = plans_for(ds)
    serial = preprocess_dataset(ds, plans, "3d_fullres", tmp_path / "serial", progress=False)
    parallel = preprocess_dataset(ds, plans, "3d_fullres", tmp_path / "parallel", workers=2, progress=False)
    for case in preprocessed_cases(serial):
        a, b = load_preprocessed_case(serial, case), load_preprocessed_case(parallel, case)
        np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])
        for c in a[2]["class_locations"]:
            np.testing.assert_array_equal(a[2]["class_locations"][c], b[2]["class_locations"][c])


def test_cli_preprocess(datasets, tmp_path):
    ds = datasets["ct_aniso"]
    r = nnlite("plan", ds, "-o", tmp_path / "plans", "-q")
    assert r.returncode == 0, r.stderr
    r = nnlite("preprocess", ds, tmp_path / "plans", "-c", "3d_fullres", "2d", "-np", "2", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/2] preprocess 3d_fullres" in r.stdout and "[2/2] preprocess 2d" in r.stdout
    for config in ("3d_fullres", "2d"):
        assert preprocessed_cases(tmp_path / "plans" / config) == ["case_000", "case_001", "case_002"]
    # into another folder: it gets the plans and dataset.json too, so it is complete for training
    r = nnlite("preprocess", ds, tmp_path / "plans" / "plans.json", "-o", tmp_path / "elsewhere", "-q")
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    assert (elsewhere / "plans.json").is_file() and (elsewhere / "dataset.json").is_file()
    plans = json.loads((tmp_path / "plans" / "plans.json").read_text())
    expected = sorted(c for c in ("2d", "3d_fullres", "3d_lowres") if c in plans["configurations"])
    folders = sorted(p.name for p in elsewhere.iterdir() if p.is_dir())
    assert folders == sorted(expected + ["gt_segmentations"])
    gt = sorted(p.name for p in (elsewhere / "gt_segmentations").iterdir())   # the labels, for validation
    assert gt == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]


def test_cli_preprocess_errors_are_one_line(datasets, tmp_path):
    r = nnlite("preprocess", datasets["ct"], tmp_path / "missing.json", "-q")
    assert r.returncode == 1
    assert r.stderr.strip() == f"nnlite: error: {tmp_path / 'missing.json'}: plans file not found"
    save_plans(plans_for(datasets["ct"]), tmp_path / "plans.json")
    r = nnlite("preprocess", datasets["ct"], tmp_path / "plans.json", "-c", "3d_lowres", "-q")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "no configuration '3d_lowres'" in r.stderr


def test_interrupted_overwrite_never_leaves_mixed_settings(dataset_copy, tmp_path, monkeypatch):
    "Killed overwriting with new plans, resumed without --overwrite: every case ends up with the new plans."
    import nnunet_lite.preprocessing as pp
    ds = dataset_copy("ct")
    plans = plans_for(ds)
    folder = preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    new = json.loads(json.dumps(plans))
    new["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    real = pp.preprocess_case

    def killed_at_case_001(image_files, label_file, *args, **kwargs):
        if "case_001" in str(label_file): raise KeyboardInterrupt
        return real(image_files, label_file, *args, **kwargs)

    monkeypatch.setattr(pp, "preprocess_case", killed_at_case_001)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(ds, new, "3d_fullres", tmp_path, progress=False, overwrite=True)
    monkeypatch.setattr(pp, "preprocess_case", real)
    preprocess_dataset(ds, new, "3d_fullres", tmp_path, progress=False)
    spacings = [load_preprocessed_case(folder, c)[2]["spacing_after_resampling"]
                for c in preprocessed_cases(folder)]
    assert spacings == [[2.0, 2.0, 2.0]] * 3


def test_wrong_channel_count_and_empty_axis_name_the_case(datasets, tmp_path):
    ds = datasets["mr"]
    plans = plans_for(ds)
    one_channel = json.loads(json.dumps(plans))
    for key in ("normalization_schemes", "use_mask_for_norm"):
        entry = one_channel["configurations"]["3d_fullres"]
        entry[key] = entry[key][:1]
    wrong_channels = r"^case_000: ValueError: the image has 2 channel\(s\), the plans expect 1"
    with pytest.raises(DatasetError, match=wrong_channels):
        preprocess_dataset(ds, one_channel, "3d_fullres", tmp_path / "a", progress=False)
    coarse = json.loads(json.dumps(plans))
    coarse["configurations"]["3d_fullres"]["spacing"] = [500.0, 1.0, 1.0]
    empty_axis = r"^case_000: ValueError: resampling shape .* leaves an empty axis"
    with pytest.raises(DatasetError, match=empty_axis):
        preprocess_dataset(ds, coarse, "3d_fullres", tmp_path / "b", progress=False)


def test_caller_threads_are_left_alone(datasets, tmp_path):
    import torch
    before = torch.get_num_threads()
    ds = datasets["ct"]
    plans = plans_for(ds)
    folder = preprocess_dataset(ds, plans, "3d_fullres", tmp_path, progress=False)
    (folder / "case_001.json").unlink()   # one case left: it runs in this process
    preprocess_dataset(ds, plans, "3d_fullres", tmp_path, workers=2, progress=False)
    assert torch.get_num_threads() == before
