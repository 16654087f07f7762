"""Conformance of nnunet_lite.fingerprint with nnU-Net v2's DatasetFingerprintExtractor on synthetic datasets,
and of the whole dataset -> fingerprint -> plans path."""
import numpy as np
import pytest

from nnunet_lite.data import read_dataset_json
from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.plans import plan_experiment

from reference_oracle import require_reference  # noqa: E402
require_reference()
from reference_oracle import reference_fingerprint, reference_plans  # noqa: E402


@pytest.fixture(scope="module")
def fingerprints(datasets):
    "(ours, reference) fingerprints of three kinds: multi-channel MR with cropping, anisotropic CT, 2D PNG."
    return {kind: (extract_fingerprint(datasets[kind], progress=False), reference_fingerprint(datasets[kind]))
            for kind in ("mr", "ct_aniso", "mr2d")}


@pytest.mark.parametrize("kind", ["mr", "ct_aniso", "mr2d"])
def test_fingerprint_equals_reference(fingerprints, kind):
    ours, ref = fingerprints[kind]
    ours = ours.to_dict()
    assert np.allclose(ours["spacings"], ref["spacings"], rtol=1e-12)
    assert ours["shapes_after_crop"] == [list(s) for s in ref["shapes_after_crop"]]
    relative_size = ref["median_relative_size_after_cropping"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(relative_size, rel=1e-12)
    ref_stats = ref["foreground_intensity_properties_per_channel"]
    assert set(ours["foreground_intensity_properties_per_channel"]) == set(ref_stats)
    for channel, stats in ref_stats.items():
        for key, value in stats.items():
            got = ours["foreground_intensity_properties_per_channel"][channel][key]
            tolerance = 1e-4 * max(1.0, abs(stats["std"]))
            assert got == pytest.approx(value, rel=1e-4, abs=tolerance), (channel, key)


@pytest.mark.parametrize("kind", ["mr", "ct_aniso", "mr2d"])
def test_plans_from_our_fingerprint_equal_reference(datasets, fingerprints, kind):
    ours_fp, ref_fp = fingerprints[kind]
    d = read_dataset_json(datasets[kind])
    ours = plan_experiment(ours_fp, d)
    ref = reference_plans(ref_fp, d)
    assert set(ours["configurations"]) == set(ref["configurations"])
    for name, cfg in ref["configurations"].items():
        for key in ("patch_size", "batch_size", "normalization_schemes", "use_mask_for_norm"):
            ours_value = ours["configurations"][name][key]
            assert list(np.atleast_1d(ours_value)) == list(np.atleast_1d(cfg[key])), (name, key)
        assert np.allclose(ours["configurations"][name]["spacing"], cfg["spacing"])
