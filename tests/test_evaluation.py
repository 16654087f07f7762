"""evaluate_folder on hostile folders: each refusal is one line naming the file(s), and nothing is written;
and evaluation without a dataset.json (labels given)."""
import json

import numpy as np
import pytest

from nnunet_lite.data import DatasetError, Geometry, write_label
from nnunet_lite.evaluation import evaluate_folder

GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
DATASET_JSON = {'labels': {'background': 0, 'organ': 1, 'lesion': 2}, 'file_ending': '.nii.gz',
                'channel_names': {'0': 'CT'}, 'numTraining': 3}


@pytest.fixture
def folders(tmp_path):
    "pred/ and gt/ with three cases each, the dataset.json beside the references."
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / 'pred', tmp_path / 'gt'
    for i in range(3):
        ref = rng.integers(0, 3, (4, 6, 7)).astype(np.uint8)
        write_label(ref, GEOMETRY, gt / f'case_{i}.nii.gz')
        write_label(np.where(rng.random(ref.shape) < 0.8, ref, 0), GEOMETRY, pred / f'case_{i}.nii.gz')
    (gt / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    return pred, gt


def refused(pred, gt, error=DatasetError, **kwargs) -> str:
    before = (pred / 'summary.json').read_bytes() if (pred / 'summary.json').exists() else None
    with pytest.raises(error) as e:
        evaluate_folder(pred, gt, progress=False, **kwargs)
    message = str(e.value)
    assert '\n' not in message, message
    after = (pred / 'summary.json').read_bytes() if (pred / 'summary.json').exists() else None
    assert after == before, 'a refused evaluation changed summary.json'
    return message


def test_a_reference_without_prediction_names_the_missing_file(folders):
    pred, gt = folders
    evaluate_folder(pred, gt, progress=False)            # a summary.json from before must survive a refusal
    (pred / 'case_1.nii.gz').unlink()
    message = refused(pred, gt, FileNotFoundError)
    assert message == f"{pred / 'case_1.nii.gz'}: prediction missing for reference {gt / 'case_1.nii.gz'}"
    (pred / 'case_2.nii.gz').unlink()
    assert refused(pred, gt, FileNotFoundError).endswith('(and 1 more)')
    summary = evaluate_folder(pred, gt, progress=False, missing_ok=True)    # a fold's own cases
    assert [r['reference_file'] for r in summary['metric_per_case']] == [str(gt / 'case_0.nii.gz')]


def test_a_prediction_without_reference_names_the_missing_file(folders):
    pred, gt = folders
    (gt / 'case_0.nii.gz').unlink()
    message = refused(pred, gt, FileNotFoundError, missing_ok=True)
    assert message.startswith(f"{gt / 'case_0.nii.gz'}: reference missing for prediction")


@pytest.mark.parametrize('side', ['pred', 'gt'])
def test_an_undeclared_label_value_names_the_file_and_values(folders, side):
    pred, gt = folders
    f = (pred if side == 'pred' else gt) / 'case_2.nii.gz'
    label = np.zeros((4, 6, 7), np.uint8); label[0, 0, :3] = [4, 9, 9]
    write_label(label, GEOMETRY, f)
    assert refused(pred, gt) == f"{f}: label values [4, 9] are not in dataset.json labels [0, 1, 2]"
    summary = evaluate_folder(pred, gt, labels=[1, 2], progress=False)   # no declared set: scored
    assert len(summary['metric_per_case']) == 3


SAID = 'differ from the reference {ref}'
GRIDS = [(dict(spacing=(2.0, 1.0, 1.5)), f'spacing {SAID} (spacing (2, 1, 1.5) vs (2, 1, 1))'),
         (dict(origin=(0.0, 0.5, 0.0)), f'origin {SAID} (origin (0, 0.5, 0) vs (0, 0, 0))'),
         (dict(direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)),
          f'direction {SAID} (direction (0, 1, 0, 1, 0, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1))')]


@pytest.mark.parametrize('change,said', GRIDS)
def test_a_prediction_on_another_grid_names_both_files(folders, change, said):
    pred, gt = folders
    f = pred / 'case_1.nii.gz'
    write_label(np.zeros((4, 6, 7), np.uint8), Geometry(**{**GEOMETRY.__dict__, **change}), f)
    assert refused(pred, gt) == f"{f}: " + said.format(ref=gt / 'case_1.nii.gz')


def test_a_prediction_of_another_shape_names_both_files(folders):
    pred, gt = folders
    write_label(np.zeros((4, 6, 6), np.uint8), GEOMETRY, pred / 'case_0.nii.gz')
    assert refused(pred, gt) == (f"{pred / 'case_0.nii.gz'}: shape (4, 6, 6) differs from the reference "
                                 f"{gt / 'case_0.nii.gz'} (4, 6, 7)")


def test_without_dataset_json_the_labels_are_given(folders):
    pred, gt = folders
    with_json = evaluate_folder(pred, gt, progress=False)
    (gt / 'dataset.json').unlink()
    message = refused(pred, gt, FileNotFoundError)
    assert 'no dataset.json beside the predictions or the references' in message and '-l 1 2' in message
    simple = evaluate_folder(pred, gt, labels=[1, 2], progress=False)
    assert simple['mean'] == with_json['mean'] and simple['foreground_mean'] == with_json['foreground_mean']
    ignored = evaluate_folder(pred, gt, labels=[1], ignore_label=2, progress=False)
    assert list(ignored['mean']) == [1] and ignored['mean'][1]['TN'] < with_json['mean'][1]['TN']
    saved = json.loads((pred / 'summary.json').read_text())
    assert sorted(saved['mean']) == ['1']


def test_the_file_ending_comes_from_the_references(folders):
    pred, gt = folders
    (gt / 'dataset.json').unlink()
    (gt / 'notes.txt').write_text('not a label')
    for i in range(3):   # the same cases as .nrrd too: two endings, the caller must choose
        write_label(np.zeros((4, 6, 7), np.uint8), GEOMETRY, gt / f'case_{i}.nrrd')
        write_label(np.zeros((4, 6, 7), np.uint8), GEOMETRY, pred / f'case_{i}.nrrd')
    message = refused(pred, gt, ValueError, labels=[1])
    assert message == f"{gt}: reference files of several endings ['.nii.gz', '.nrrd']; pass file_ending"
    summary = evaluate_folder(pred, gt, labels=[1], file_ending='.nrrd', progress=False)
    names = [r['prediction_file'].rsplit('/', 1)[1] for r in summary['metric_per_case']]
    assert names == ['case_0.nrrd', 'case_1.nrrd', 'case_2.nrrd']
    assert np.isnan(summary['mean'][1]['Dice'])
    with pytest.raises(ValueError, match='at least one label'):
        evaluate_folder(pred, gt, labels=[], progress=False)


def test_the_evaluate_command_without_dataset_json(folders):
    "As nnUNetv2_evaluate_simple: -l and --ignore-label; a missing prediction refused unless --chill."
    from cli_runner import nnlite
    pred, gt = folders
    (gt / 'dataset.json').unlink()
    r = nnlite('evaluate', pred, gt, '-l', 1, 2, '--ignore-label', 0, '-q')
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads((pred / 'summary.json').read_text())['mean']) == ['1', '2']
    (pred / 'case_2.nii.gz').unlink()
    r = nnlite('evaluate', pred, gt, '-l', 1, 2, '-q')
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"nnlite: error: {pred / 'case_2.nii.gz'}: prediction missing for reference {gt / 'case_2.nii.gz'}"]
    r = nnlite('evaluate', pred, gt, '-l', 1, 2, '--chill', '-q')
    assert r.returncode == 0, r.stderr
    assert len(json.loads((pred / 'summary.json').read_text())['metric_per_case']) == 2
