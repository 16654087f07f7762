"""Uncertainty as a user runs it: a cyclic run keeps its snapshots, `nnlite predict --uncertainty snapshots`
writes the ensemble's segmentations, entropy and mutual-information maps on each input's grid and the
scores, and on test images made noisy on purpose the score rises as Dice falls (a bounded CPU run: about
2 minutes on 2 cores)."""
import json

import numpy as np
from scipy import stats

from nnunet_lite.data import make_synthetic_dataset, read_image, read_label
from nnunet_lite.uncertainty import make_corrupted_set, uncertainty_table

from cli_runner import nnlite, ok  # noqa: E402


def test_snapshot_uncertainty_through_the_cli_ranks_noisy_cases(tmp_path):
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=8, n_test=2, n_classes=2, shape=(20, 32, 32),
                                 progress=False)
    pre = tmp_path / 'pre'
    ok(nnlite('plan', raw, '-o', pre, '-q'))
    ok(nnlite('preprocess', raw, pre, '-c', '3d_fullres', '-np', 1, '-q'))
    r = ok(nnlite('train', pre, '-c', '3d_fullres', '-f', 'all', '--epochs', 12, '--iters', 10,
                  '--val-iters', 0, '--cyclic', 3, '--no-validation', '--device', 'cpu', '-q'))
    assert '3 learning-rate cycles' in r.stdout
    model = pre / 'results' / '3d_fullres'
    assert sorted(p.name for p in (model / 'fold_all').glob('checkpoint_snapshot_*.pth')) == [
        f'checkpoint_snapshot_{k}.pth' for k in (1, 2, 3)]

    bad = make_corrupted_set(raw, tmp_path / 'bad', kinds=('noise',), levels=(1, 3), progress=False)
    out = tmp_path / 'out'
    r = ok(nnlite('predict', '-i', bad / 'imagesTs', '-o', out, '-m', model, '--uncertainty', 'snapshots',
                  '--device', 'cpu', '-q'))
    assert 'snapshots: 3 members' in r.stdout and 'most uncertain' in r.stdout
    info = json.loads((out / 'uncertainty.json').read_text())
    assert info['method'] == 'snapshots' and len(info['members']) == 3
    assert sorted(info['cases']) == [f'test_00{i}__{k}' for i in (0, 1)
                                     for k in ('clean', 'noise_1', 'noise_3')]
    for case in info['cases']:
        image, geometry = read_image([bad / 'imagesTs' / f'{case}_0000.nii.gz'])
        label, label_geometry = read_label(out / f'{case}.nii.gz')
        assert label.shape == image.shape[1:] and label_geometry.same_grid(geometry) == []
        for name in ('entropy', 'mutual_information'):
            m, g = read_image([out / 'uncertainty' / f'{case}_{name}.nii.gz'])
            assert m.shape == image.shape and g.same_grid(geometry) == [], (case, name)
            assert (m >= 0).all() and m.max() <= np.log(3) + 1e-4

    r = ok(nnlite('evaluate-uncertainty', out, bad / 'labelsTs', '-q'))
    assert 'spearman_vs_dice' in r.stdout and (out / 'uncertainty_vs_dice.png').stat().st_size > 1000
    table = uncertainty_table(out / 'uncertainty.json', out / 'summary.json')
    rho = stats.spearmanr(table['score'], table['Dice'])[0]
    assert rho < 0, table
    for case in ('test_000', 'test_001'):
        assert table.loc[f'{case}__noise_3', 'score'] > table.loc[f'{case}__clean', 'score'], table


def test_uncertainty_errors_are_one_line(tmp_path):
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=3, n_test=1, shape=(12, 20, 20),
                                 progress=False)
    pre = tmp_path / 'pre'
    ok(nnlite('plan', raw, '-o', pre, '-q'))
    ok(nnlite('preprocess', raw, pre, '-c', '3d_fullres', '-np', 1, '-q'))
    ok(nnlite('train', pre, '-c', '3d_fullres', '-f', 'all', '--epochs', 1, '--iters', 1, '--val-iters', 0,
              '--no-validation', '-q'))
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'o', '-m', pre / 'results' / '3d_fullres',
               '--uncertainty', 'snapshots', '-q')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'no fold with checkpoint_snapshot_' in r.stderr and '--cyclic' in r.stderr
    r = nnlite('evaluate-uncertainty', tmp_path / 'o', raw / 'labelsTs', '-q')
    assert r.returncode == 1 and 'uncertainty.json: not found' in r.stderr
