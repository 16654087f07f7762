"""Evaluation against nnU-Net v2's compute_metrics and compute_metrics_on_folder, and `nnlite evaluate`."""
import json

import numpy as np
import pytest

from nnunet_lite.data import Geometry, write_label
from nnunet_lite.evaluation import case_metrics, evaluate_folder

from cli_runner import nnlite
from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.evaluation.evaluate_predictions import compute_metrics, compute_metrics_on_folder  # noqa: E402
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: E402

GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def random_pair(rng, n_labels, shape=(6, 9, 11)):
    ref = rng.integers(0, n_labels, shape).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.7, ref, rng.integers(0, n_labels, shape)).astype(np.uint8)
    return ref, pred


@pytest.mark.parametrize("classes,ignore", [([1, 2, 3], None), ([1, 2], 3), ([1, 2, 3, 4], None),
                                            ([(1, 2, 3), (2, 3), (3,)], None), ([(1, 2), (2,)], 3)])
@pytest.mark.parametrize("seed", range(3))
def test_case_metrics_equal_compute_metrics(tmp_path, classes, ignore, seed):
    rng = np.random.default_rng(seed)
    ref, pred = random_pair(rng, 4)
    if seed == 2: pred[pred == 1] = 0; ref[ref == 1] = 0          # a label absent from both: NaN
    write_label(ref, GEOMETRY, tmp_path / 'ref.nii.gz'); write_label(pred, GEOMETRY, tmp_path / 'pred.nii.gz')
    theirs = compute_metrics(str(tmp_path / 'ref.nii.gz'), str(tmp_path / 'pred.nii.gz'), SimpleITKIO(),
                             classes, ignore)['metrics']
    ours = case_metrics(ref, pred, classes, ignore)
    for c in classes:
        for m, v in theirs[c].items():
            np.testing.assert_equal(ours[c][m], v, err_msg=f"{c} {m}")


def test_folder_summary_equals_compute_metrics_on_folder(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / 'gt').mkdir(); (tmp_path / 'pred').mkdir()
    for i in range(4):
        ref, pred = random_pair(rng, 3)
        if i == 0: ref[ref == 2] = 0; pred[pred == 2] = 0
        write_label(ref, GEOMETRY, tmp_path / 'gt' / f'c{i}.nii.gz')
        write_label(pred, GEOMETRY, tmp_path / 'pred' / f'c{i}.nii.gz')
    dataset_json = {'labels': {'background': 0, 'a': 1, 'b': 2}, 'file_ending': '.nii.gz',
                    'channel_names': {'0': 'x'}, 'numTraining': 4}
    (tmp_path / 'gt' / 'dataset.json').write_text(json.dumps(dataset_json))
    ours = evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', progress=False)
    theirs = compute_metrics_on_folder(str(tmp_path / 'gt'), str(tmp_path / 'pred'),
                                       str(tmp_path / 'theirs.json'), SimpleITKIO(), '.nii.gz', [1, 2], None,
                                       num_processes=1)
    for c in (1, 2):
        for m, v in theirs['mean'][c].items():
            np.testing.assert_allclose(ours['mean'][c][m], v, err_msg=f"{c} {m}")
    for m, v in theirs['foreground_mean'].items(): np.testing.assert_allclose(ours['foreground_mean'][m], v)
    saved = json.loads((tmp_path / 'pred' / 'summary.json').read_text())
    ref_saved = json.loads((tmp_path / 'theirs.json').read_text())
    assert sorted(saved) == sorted(ref_saved) and sorted(saved['mean']) == sorted(ref_saved['mean'])
    r = nnlite('evaluate', tmp_path / 'pred', tmp_path / 'gt', '-q', '-o', tmp_path / 'cli.json')
    assert r.returncode == 0, r.stderr
    assert 'foreground mean Dice' in r.stdout and (tmp_path / 'cli.json').exists()
    (tmp_path / 'gt' / 'c3.nii.gz').unlink()
    r = nnlite('evaluate', tmp_path / 'pred', tmp_path / 'gt', '-q')
    assert r.returncode == 1 and 'c3.nii.gz: reference missing' in r.stderr


@pytest.mark.parametrize("labels,ignore", [([1, 2, 3], None), ([1], 3), ([0, 1, 2], None)])
def test_without_dataset_json_equals_compute_metrics_on_folder_simple(tmp_path, labels, ignore):
    "nnUNetv2_evaluate_simple GT PRED -l ... [-il ...]: no dataset.json, the labels given."
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
    rng = np.random.default_rng(11)
    (tmp_path / 'gt').mkdir(); (tmp_path / 'pred').mkdir()
    for i in range(4):
        ref, pred = random_pair(rng, 4)
        if i == 1: ref[ref == 2] = 0; pred[pred == 2] = 0          # label 2 absent from both: NaN
        write_label(ref, GEOMETRY, tmp_path / 'gt' / f'c{i}.nii.gz')
        write_label(pred, GEOMETRY, tmp_path / 'pred' / f'c{i}.nii.gz')
    ours = evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', labels=labels, ignore_label=ignore,
                           output_file=tmp_path / 'ours.json', progress=False)
    compute_metrics_on_folder_simple(str(tmp_path / 'gt'), str(tmp_path / 'pred'), labels,
                                     str(tmp_path / 'theirs.json'), num_processes=1, ignore_label=ignore)
    saved, theirs = (json.loads((tmp_path / f).read_text()) for f in ('ours.json', 'theirs.json'))
    assert sorted(saved) == sorted(theirs) and sorted(saved['mean']) == sorted(theirs['mean'])
    assert [r['prediction_file'] for r in saved['metric_per_case']] == \
        [r['prediction_file'] for r in theirs['metric_per_case']]
    assert [r['reference_file'] for r in saved['metric_per_case']] == \
        [r['reference_file'] for r in theirs['metric_per_case']]
    for mine, ref in zip(saved['metric_per_case'], theirs['metric_per_case']):
        assert sorted(mine['metrics']) == sorted(ref['metrics'])
        for c, metrics in ref['metrics'].items():
            assert sorted(mine['metrics'][c]) == sorted(metrics)
            for m, v in metrics.items():
                np.testing.assert_equal(mine['metrics'][c][m], v, err_msg=f"{mine['prediction_file']} {c}")
    for c, metrics in theirs['mean'].items():
        for m, v in metrics.items():
            np.testing.assert_allclose(saved['mean'][c][m], v, rtol=1e-12, err_msg=f"mean {c} {m}")
    for m, v in theirs['foreground_mean'].items():
        np.testing.assert_allclose(saved['foreground_mean'][m], v, rtol=1e-12, err_msg=f"foreground {m}")
    assert ours['foreground_mean'] == saved['foreground_mean']
