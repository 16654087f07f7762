"""The empirical stage through the command line: five folds of 2d and of 3d_fullres at a tiny budget,
`find-best` (refusing ensembles until the probabilities are there), predicting from its instructions,
`ensemble`, and a model zipped and unpacked elsewhere."""
import json
import zipfile

import numpy as np

from nnunet_lite.data import make_synthetic_dataset, read_image, read_label
from nnunet_lite.ensembling import average_probabilities

from cli_runner import nnlite, ok  # noqa: E402


def test_find_best_end_to_end_through_the_cli(tmp_path):
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=6, n_test=2, n_classes=2, shape=(12, 24, 24),
                                 progress=False)
    pre, results = tmp_path / 'pre', tmp_path / 'pre' / 'results'
    ok(nnlite('plan', raw, '-o', pre, '-q'))
    ok(nnlite('preprocess', raw, pre, '-c', '2d', '3d_fullres', '-np', 1, '-q'))
    short = ('--epochs', 1, '--iters', 2, '--val-iters', 1, '--device', 'cpu', '-q')
    ok(nnlite('train', pre, '-c', '2d', '-f', 0, 1, 2, 3, 4, '--npz', *short))
    ok(nnlite('train', pre, '-c', '3d_fullres', '-f', 0, 1, 2, 3, 4, *short))      # no probabilities kept
    kept = sorted(p.stem for p in results.glob('2d/fold_*/validation/*.npz'))
    assert kept == [f'case_{i:03d}' for i in range(6)]

    r = nnlite('find-best', results, '-q')     # the pair needs 3d_fullres's probabilities: one line says how
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'no CASE.npz probabilities' in r.stderr and 'nnlite validate' in r.stderr
    ok(nnlite('validate', pre, '-c', '3d_fullres', '-f', 0, 1, 2, 3, 4, '--npz', '--device', 'cpu', '-q'))

    r = ok(nnlite('find-best', results, '-q'))
    info = json.loads((results / 'inference_instructions.json').read_text())
    names = ['2d', '3d_fullres', 'ensemble___2d___3d_fullres___0_1_2_3_4']
    assert list(info['all_results']) == names and info['best_model_or_ensemble']['name'] in names
    assert 'nnlite predict -i INPUT_FOLDER -o OUTPUT_FOLDER -m' in r.stdout
    assert (results / 'candidates.png').is_file()
    for name in ('2d', '3d_fullres'):
        summary_file = results / name / 'crossval_results_folds_0_1_2_3_4' / 'summary.json'
        summary = json.loads(summary_file.read_text())
        assert len(summary['metric_per_case']) == 6
        assert abs(summary['foreground_mean']['Dice'] - info['all_results'][name]) < 1e-12

    out = tmp_path / 'test_predictions'
    ok(nnlite('predict', '-i', raw / 'imagesTs', '-o', out, '-m', results / 'inference_instructions.json',
              '--device', 'cpu', '-q'))
    for case in ('test_000', 'test_001'):
        _, image_geometry = read_image([raw / 'imagesTs' / f'{case}_0000.nii.gz'])
        label, geometry = read_label(out / f'{case}.nii.gz')
        assert geometry == image_geometry and label.max() <= 2

    # the same ensemble by hand: each model's predictions with probabilities, then `nnlite ensemble`
    for name in ('2d', '3d_fullres'):
        ok(nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / name, '-m', results / name,
                  '--save-probabilities', '--device', 'cpu', '-q'))
    ok(nnlite('ensemble', '-i', tmp_path / '2d', tmp_path / '3d_fullres', '-o', tmp_path / 'ens', '-q'))
    mean = average_probabilities([tmp_path / name / 'test_000.npz' for name in ('2d', '3d_fullres')])
    assert (read_label(tmp_path / 'ens' / 'test_000.nii.gz')[0] == mean.argmax(0)).all()

    # shared: zipped, unpacked elsewhere, the instructions still work from there
    ok(nnlite('export-model', results, '-o', tmp_path / 'model.zip'))
    members = zipfile.ZipFile(tmp_path / 'model.zip').namelist()
    assert 'results/2d/fold_0/checkpoint_final.pth' in members
    assert not any(m.endswith('.npz') for m in members)
    ok(nnlite('import-model', tmp_path / 'model.zip', '-o', tmp_path / 'installed'))
    r = nnlite('import-model', tmp_path / 'model.zip', '-o', tmp_path / 'installed')
    assert r.returncode == 1 and 'exists' in r.stderr
    with zipfile.ZipFile(tmp_path / 'no_model.zip', 'w') as z:       # a checkpoint without its plans
        z.write(results / '2d' / 'fold_0' / 'checkpoint_final.pth', 'results/2d/fold_0/checkpoint_final.pth')
    r = nnlite('import-model', tmp_path / 'no_model.zip', '-o', tmp_path / 'nothing')
    assert r.returncode == 1 and r.stderr.strip() == (
        f"nnlite: error: {tmp_path / 'no_model.zip'}: holds no model folder (plans.json, dataset.json and "
        f"fold_*/checkpoint*.pth); nothing extracted") and not (tmp_path / 'nothing').exists()
    ok(nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'again', '-m',
              tmp_path / 'installed' / 'results' / 'inference_instructions.json', '--device', 'cpu', '-q'))
    for case in ('test_000', 'test_001'):
        assert np.array_equal(read_label(tmp_path / 'again' / f'{case}.nii.gz')[0],
                              read_label(out / f'{case}.nii.gz')[0])
