"""nnunet_lite.data as scripts use it: geometry round trips, fault injection, every integrity failure and the
synthetic generator."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_lite import data
from nnunet_lite.data import (DatasetError, Geometry, check_dataset, make_synthetic_dataset, read_file,
                              read_image, read_label, synth_spec, synthetic_case, training_cases,
                              verify_dataset, write_file, write_label)


def random_direction(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0: q[:, 0] *= -1
    return tuple(q.ravel())


# --- geometry round trip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometry_round_trip_oblique_anisotropic(tmp_path, ending, seed):
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=(1, 5, 7, 9)).astype(np.float32)
    geo = Geometry(spacing=tuple(rng.uniform(0.3, 6.0, 3)), origin=tuple(rng.uniform(-300, 300, 3)),
                   direction=random_direction(rng))
    write_file(arr, geo, tmp_path / f"a{ending}")
    back, g1 = read_file(tmp_path / f"a{ending}")
    assert np.array_equal(back, arr)
    assert g1.same_grid(geo) == []
    assert np.allclose(g1.spacing, geo.spacing, rtol=1e-6)
    # sitk and our record agree on axis order: sitk's x spacing is our last
    img = sitk.ReadImage(str(tmp_path / f"a{ending}"))
    assert np.allclose(img.GetSpacing(), g1.spacing[::-1])
    assert img.GetSize() == arr.shape[1:][::-1]
    # what was read writes back unchanged (NIfTI keeps the rotation as a float32 quaternion: ~1e-7)
    write_file(back, g1, tmp_path / f"b{ending}")
    assert read_file(tmp_path / f"b{ending}")[1].same_grid(g1, rtol=0, atol=1e-6) == []


def test_label_round_trip_keeps_values_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    geo = Geometry((3.0, 0.7, 0.7), (1.0, 2.0, 3.0), random_direction(rng))
    for hi, pixel in [(3, sitk.sitkUInt8), (300, sitk.sitkUInt16)]:
        lab = rng.integers(0, hi + 1, size=(4, 6, 8))
        write_label(lab, geo, tmp_path / "l.nii.gz")
        back, g = read_label(tmp_path / "l.nii.gz")
        assert np.array_equal(back, lab) and back.dtype == np.int16 and g.same_grid(geo) == []
        assert sitk.ReadImage(str(tmp_path / "l.nii.gz")).GetPixelID() == pixel


def test_2d_files_read_as_one_slice_and_write_back_2d(tmp_path):
    img = sitk.GetImageFromArray(np.arange(20, dtype=np.float32).reshape(4, 5))
    img.SetSpacing((0.5, 0.25)); img.SetOrigin((3.0, 4.0)); img.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "s.nii.gz"))
    arr, geo = read_file(tmp_path / "s.nii.gz")
    assert arr.shape == (1, 1, 4, 5)
    assert geo.spacing == (999 * 0.5, 0.25, 0.5) and geo.file_ndim == 2
    write_file(arr, geo, tmp_path / "t.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "t.nii.gz"))
    assert back.GetDimension() == 2 and back.GetSpacing() == (0.5, 0.25)
    assert back.GetDirection() == (0.0, 1.0, 1.0, 0.0)


# --- fault injection ----------------------------------------------------------------------------------------

def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    geo = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    good = np.ones((1, 3, 4, 5), np.float32)
    write_file(good, geo, tmp_path / "img.nii.gz")
    real_write = sitk.WriteImage

    def crash_midway(image, path, *args):
        Path(path).write_bytes(b"half a file")   # the partial output a crash leaves behind
        raise RuntimeError("disk full")
    monkeypatch.setattr(data.sitk, "WriteImage", crash_midway)
    with pytest.raises(DatasetError, match=r"img\.nii\.gz: cannot be written \(disk full\)"):
        write_file(good * 2, geo, tmp_path / "img.nii.gz")
    monkeypatch.setattr(data.sitk, "WriteImage", real_write)
    assert np.array_equal(read_file(tmp_path / "img.nii.gz")[0], good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz"]


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(DatasetError, match=r"x\.nii\.gz: cannot be read"):
        read_file(tmp_path / "x.nii.gz")
    with pytest.raises(DatasetError, match=r"y\.nii\.gz: file not found"):
        read_image([tmp_path / "y.nii.gz"])


def test_dataset_json_errors_name_the_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON"):
        data.read_dataset_json(tmp_path)
    problems = check_dataset(tmp_path, progress=False)
    assert [str(p).split(": ", 1)[1][:20] for p in problems] == ["not valid JSON (Expe"]


def test_interrupted_synthesis_is_not_a_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = data.write_label

    def fail_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(data, "write_label", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "ds", "ct", n_train=4, n_test=0, workers=1, progress=False)
    assert not (tmp_path / "ds" / "dataset.json").exists()
    assert not [p for p in (tmp_path / "ds").rglob("*") if ".tmp" in p.name]


# --- every integrity failure --------------------------------------------------------------------------------

def _rewrite_label(path, fn):
    lab, geo = read_label(path)
    lab, geo = fn(lab, geo)
    write_label(lab, geo, path)


def _rewrite_image(path, fn):
    arr, geo = read_file(path)
    arr, geo = fn(arr, geo)
    write_file(arr, geo, path)


def _set_json(ds, **changes):
    d = json.loads((ds / "dataset.json").read_text())
    d.update(changes)
    (ds / "dataset.json").write_text(json.dumps(d))


def _drop_json_key(ds, key):
    d = json.loads((ds / "dataset.json").read_text())
    del d[key]
    (ds / "dataset.json").write_text(json.dumps(d))


SWAPPED_XY = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # a direction with the x and y axes swapped


BREAKAGES = {
    "missing channel": (lambda ds: (ds / "imagesTr" / "case_000_0001.nii.gz").unlink(),
                        "imagesTr/case_000_0001.nii.gz: missing: channel 1 ('T2') of case 'case_000'"),
    "missing label": (lambda ds: (ds / "labelsTr" / "case_001.nii.gz").unlink(),
                      "labelsTr/case_001.nii.gz: missing: case 'case_001' has images but no label"),
    "label without images": (lambda ds: shutil.copy(ds / "labelsTr" / "case_000.nii.gz",
                                                    ds / "labelsTr" / "ghost.nii.gz"),
                             "labelsTr/ghost.nii.gz: label without images"),
    "stray file": (lambda ds: (ds / "imagesTr" / "case_000.nii.gz").write_bytes(b""),
                   "imagesTr/case_000.nii.gz: does not follow the CASE_XXXX.nii.gz naming"),
    "wrong file ending": (lambda ds: shutil.copy(ds / "labelsTr" / "case_000.nii.gz",
                                                 ds / "labelsTr" / "case_009.nrrd"),
                          "labelsTr/case_009.nrrd: not a .nii.gz file"),
    "extra channel": (lambda ds: shutil.copy(ds / "imagesTr" / "case_000_0000.nii.gz",
                                             ds / "imagesTr" / "case_000_0002.nii.gz"),
                      "imagesTr/case_000_0002.nii.gz: channel index 2 but dataset.json has 2 channel(s)"),
    "numTraining": (lambda ds: _set_json(ds, numTraining=5),
                    "dataset.json: numTraining is 5 but 3 complete training case(s) were found"),
    "unreadable": (lambda ds: (ds / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"\x00" * 10),
                   "imagesTr/case_002_0000.nii.gz: cannot be read"),
    "shape": (lambda ds: _rewrite_label(ds / "labelsTr" / "case_000.nii.gz", lambda l, g: (l[:, 1:], g)),
              "labelsTr/case_000.nii.gz: shape"),
    "spacing": (lambda ds: _rewrite_label(ds / "labelsTr" / "case_000.nii.gz",
                                          lambda l, g: (l, replace(g, spacing=(2.0, 1.0, 1.0)))),
                "labelsTr/case_000.nii.gz: spacing differ from image case_000_0000.nii.gz"),
    "origin": (lambda ds: _rewrite_image(ds / "imagesTr" / "case_001_0001.nii.gz",
                                         lambda a, g: (a, replace(g, origin=(0.0, 0.0, 0.0)))),
               "imagesTr/case_001_0001.nii.gz: origin differ from case_001_0000.nii.gz"),
    "direction": (lambda ds: _rewrite_label(ds / "labelsTr" / "case_002.nii.gz",
                                            lambda l, g: (l, replace(g, direction=SWAPPED_XY))),
                  "labelsTr/case_002.nii.gz: direction differ from image"),
    "undeclared label": (lambda ds: _rewrite_label(ds / "labelsTr" / "case_000.nii.gz",
                                                   lambda l, g: (np.where(l == 2, 9, l), g)),
                         "labelsTr/case_000.nii.gz: label values [9] are not in dataset.json labels "
                         "[0, 1, 2, 3]"),
    "declared label never present": (lambda ds: [_rewrite_label(f, lambda l, g: (np.where(l == 3, 1, l), g))
                                                 for f in (ds / "labelsTr").iterdir()],
                                     "dataset.json: label 'vessel' (3) appears in no training label map"),
    "NaN": (lambda ds: _rewrite_image(ds / "imagesTr" / "case_001_0000.nii.gz",
                                      lambda a, g: (np.where(a == a.max(), np.nan, a), g)),
            "imagesTr/case_001_0000.nii.gz: contains 1 NaN and 0 inf voxels"),
    "inf": (lambda ds: _rewrite_image(ds / "imagesTs" / "test_000_0001.nii.gz",
                                      lambda a, g: (np.where(a == a.max(), np.inf, a), g)),
            "imagesTs/test_000_0001.nii.gz: contains 0 NaN and 1 inf voxels"),
    "non-integer label": (lambda ds: _rewrite_image(ds / "labelsTr" / "case_001.nii.gz",
                                                    lambda a, g: (a.astype(np.float32) * 0.5, g)),
                          "labelsTr/case_001.nii.gz: label map has non-integer values"),
    "labels not consecutive": (lambda ds: _set_json(ds, labels={"background": 0, "organ": 1, "lesion": 2,
                                                                "vessel": 4}),
                               "dataset.json: label values must be consecutive integers"),
    "missing key": (lambda ds: _drop_json_key(ds, "file_ending"),
                    "dataset.json: missing required key 'file_ending'"),
    "test case channel missing": (lambda ds: (ds / "imagesTs" / "test_000_0000.nii.gz").unlink(),
                                  "imagesTs/test_000_0000.nii.gz: missing: channel 0"),
    "no imagesTr": (lambda ds: shutil.rmtree(ds / "imagesTr"), "imagesTr: folder not found"),
}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_every_integrity_failure_has_its_message(dataset_copy, kind):
    ds = dataset_copy("mr")
    assert check_dataset(ds, progress=False) == []
    breakage, expected = BREAKAGES[kind]
    breakage(ds)
    lines = [str(p) for p in check_dataset(ds, progress=False)]
    assert any(expected in line for line in lines), "\n".join(lines)
    assert all(": " in line and line.split(": ", 1)[0].startswith(str(ds)) for line in lines), lines
    with pytest.raises(DatasetError):
        verify_dataset(ds, progress=False)


def test_all_failures_are_reported_together(dataset_copy):
    ds = dataset_copy("mr")
    for kind in ("missing label", "stray file", "undeclared label", "NaN", "origin"):
        BREAKAGES[kind][0](ds)
    lines = [str(p) for p in check_dataset(ds, progress=False)]
    for kind in ("missing label", "stray file", "undeclared label", "NaN", "origin"):
        assert any(BREAKAGES[kind][1] in l for l in lines), (kind, lines)


def test_rgb_png_counts_three_channels_in_one_file(tmp_path):
    geo = Geometry((999.0, 1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    for i in range(2):
        write_file(rng.integers(0, 255, (3, 1, 8, 8)).astype(np.uint8), geo,
                   tmp_path / "imagesTr" / f"road_{i}_0000.png")
        write_label(np.arange(64).reshape(1, 8, 8) % 2, geo, tmp_path / "labelsTr" / f"road_{i}.png")
    data.write_dataset_json(tmp_path, {"0": "R", "1": "G", "2": "B"}, {"background": 0, "road": 1}, 2, ".png")
    assert check_dataset(tmp_path, progress=False) == []
    assert read_image(training_cases(tmp_path)["road_0"]["images"])[0].shape == (3, 1, 8, 8)


def test_explicit_file_lists_in_dataset_json(dataset_copy):
    ds = dataset_copy("ct")
    d = json.loads((ds / "dataset.json").read_text())
    d["dataset"] = {c: {"images": [str(p.relative_to(ds)) for p in v["images"]],
                        "label": str(v["label"].relative_to(ds))}
                    for c, v in training_cases(ds).items()}
    (ds / "dataset.json").write_text(json.dumps(d))
    assert check_dataset(ds, progress=False) == []
    (ds / "labelsTr" / "case_000.nii.gz").unlink()
    problems = check_dataset(ds, progress=False)
    assert any("listed in dataset.json for case 'case_000' but not found" in str(p) for p in problems)


# --- the generator ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ct", "mr", "ct_aniso", "mr_aniso", "ct2d", "mr2d"])
def test_generator_is_deterministic_by_seed(kind):
    spec = synth_spec(kind)
    for split, index in [(0, 0), (1, 0)]:
        a, b = synthetic_case(spec, split, index), synthetic_case(spec, split, index)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    other = synthetic_case(replace(spec, seed=spec.seed + 1), 0, 0)
    same = synthetic_case(spec, 0, 0)
    assert other[0].shape != same[0].shape or not np.array_equal(other[0], same[0])


def test_a_case_does_not_change_when_more_cases_are_asked_for(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", "ct", n_train=2, n_test=0, progress=False)
    b = make_synthetic_dataset(tmp_path / "b", "ct", n_train=4, n_test=0, progress=False)
    assert np.array_equal(read_label(a / "labelsTr" / "case_001.nii.gz")[0],
                          read_label(b / "labelsTr" / "case_001.nii.gz")[0])


def test_every_kind_passes_the_check_and_has_its_features(datasets):
    for kind, ds in datasets.items():
        assert check_dataset(ds, progress=False) == [], kind
        d = json.loads((ds / "dataset.json").read_text())
        img, geo = read_image(training_cases(ds)["case_000"]["images"])
        lab, _ = read_label(training_cases(ds)["case_000"]["label"])
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        if kind.startswith("ct"):
            assert d["channel_names"] == {"0": "CT"} and img.min() <= -990 and img[0][lab == 1].mean() > 40
        else:
            assert list(d["channel_names"].values())[0] == "T1"
            assert (img[:, 0, 0, 0] == 0).all() and (img == 0).mean() > 0.2, "MR background is zero"
        if kind.endswith("2d"):
            assert img.shape[1] == 1 and geo.file_ndim == 2
            assert np.isclose(geo.spacing[0], 999 * max(geo.spacing[1:]))
        if kind.endswith("aniso"):
            assert geo.spacing[0] / geo.spacing[1] > 4


def test_spacing_jitter_and_shape_jitter_vary_across_cases(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "j", "mr_aniso", n_train=5, n_test=0, progress=False)
    geos = [read_image(v["images"])[1] for v in training_cases(ds).values()]
    shapes = [read_image(v["images"])[0].shape for v in training_cases(ds).values()]
    assert len({g.spacing for g in geos}) > 1 and len(set(shapes)) > 1


def test_classes_are_blob_nested_and_thin():
    from scipy import ndimage
    img, lab, geo = synthetic_case(synth_spec("ct", shape=(40, 56, 56)), 0, 3)
    organ, lesion, vessel = lab == 1, lab == 2, lab == 3
    assert organ.sum() > lesion.sum() > 0 and vessel.sum() > 0
    # the lesion is nested: its boundary touches organ (or vessel) but no background
    shell = ndimage.binary_dilation(lesion) & ~lesion
    assert (lab[shell] == 0).mean() < 0.05
    # the vessel is thin: erosion by 2 voxels nearly removes it, unlike the organ
    assert ndimage.binary_erosion(vessel, iterations=2).sum() < 0.1 * vessel.sum()
    assert ndimage.binary_erosion(organ, iterations=2).sum() > 0.3 * organ.sum()


# --- header spacing 0 (SimpleITK reads 1 mm) ---------------------------------------------------------------

def nifti_with_pixdim(src: Path, dst: Path, axis: int, value: float, nifti2: bool = False):
    "A copy of NIfTI file `src` whose header gives voxel size `value` along `axis` (1: x, 2: y, 3: z)."
    import gzip
    import struct
    raw = bytearray(gzip.decompress(src.read_bytes()) if src.name.endswith('.gz') else src.read_bytes())
    if nifti2: struct.pack_into('<d', raw, 104 + 8 * axis, value)
    else: struct.pack_into('<f', raw, 76 + 4 * axis, value)
    dst.write_bytes(gzip.compress(bytes(raw)) if dst.name.endswith('.gz') else bytes(raw))


@pytest.mark.parametrize("value,said", [(0.0, "is 0;"), (float('nan'), "is nan;"),
                                        (float('-inf'), "is -inf;"), (-2.0, "is -2; a spacing must be")])
@pytest.mark.parametrize("axis", [1, 2, 3])
def test_a_bad_header_spacing_is_refused_naming_the_file_and_axis(tmp_path, axis, value, said):
    geometry = Geometry((3.0, 0.8, 0.7), (0, 0, 0), tuple(np.eye(3).ravel()))
    write_label(np.ones((4, 5, 6), np.uint8), geometry, tmp_path / 'ok.nii.gz')
    for name in ('bad.nii.gz', 'bad.nii'):
        nifti_with_pixdim(tmp_path / 'ok.nii.gz', tmp_path / name, axis, value)
        if value == 0:   # the trap: SimpleITK reads 1 mm
            assert sitk.ReadImage(str(tmp_path / name)).GetSpacing()[axis - 1] == 1.0
        for reader in (read_file, read_label, read_image):
            with pytest.raises(DatasetError) as e: reader(tmp_path / name)
            message = str(e.value)
            head = f"{tmp_path / name}: header spacing of the {'xyz'[axis - 1]} axis (pixdim[{axis}])"
            assert message.startswith(head) and said in message and '\n' not in message, message


def test_nifti2_and_2d_headers_are_checked_too(tmp_path):
    nib = pytest.importorskip('nibabel')      # SimpleITK neither writes nor reads NIfTI-2: the header alone
    two = nib.Nifti2Image(np.zeros((6, 5, 4), np.int16), np.diag([0.7, 0.8, 3.0, 1.0]))
    nib.save(two, str(tmp_path / 'two.nii'))
    assert data.nifti_spacing_problem(tmp_path / 'two.nii') is None
    nifti_with_pixdim(tmp_path / 'two.nii', tmp_path / 'two0.nii', 3, 0.0, nifti2=True)
    said = data.nifti_spacing_problem(tmp_path / 'two0.nii')
    assert said.startswith("header spacing of the z axis (pixdim[3]) is 0"), said
    flat = tmp_path / 'flat.nii.gz'   # a 2D file: only its two axes count
    write_file(np.zeros((1, 1, 5, 6), np.uint8), Geometry((999.0, 0.5, 0.5), (0, 0), (1, 0, 0, 1)), flat)
    assert read_file(flat)[1].spacing == (999.0 * 0.5, 0.5, 0.5)
    nifti_with_pixdim(flat, tmp_path / 'flat0.nii.gz', 2, 0.0)
    with pytest.raises(DatasetError, match=r"y axis \(pixdim\[2\]\) is 0"):
        read_file(tmp_path / 'flat0.nii.gz')


def test_check_dataset_reports_a_zero_header_spacing(dataset_copy):
    ds = dataset_copy('mr')
    image, label = ds / 'imagesTr' / 'case_001_0001.nii.gz', ds / 'labelsTr' / 'case_002.nii.gz'
    nifti_with_pixdim(image, image, 3, 0.0)
    nifti_with_pixdim(label, label, 1, float('nan'))
    said = [str(p) for p in check_dataset(ds, progress=False)]
    assert f"{image}: header spacing of the z axis (pixdim[3]) is 0; a spacing must be positive and finite " \
           f"(SimpleITK would read 1 mm)" in said, said
    assert any(s.startswith(f"{label}: header spacing of the x axis (pixdim[1]) is nan") for s in said), said
