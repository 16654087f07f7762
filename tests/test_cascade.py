"""The 3D cascade through the command line: the first stage's folds hand their validation predictions on,
the second stage trains on them as extra input channels, refuses to train without them and predicts new
images."""
import json

import numpy as np

from nnunet_lite.data import make_synthetic_dataset, read_label
from nnunet_lite.training import load_checkpoint

from cli_runner import nnlite  # noqa: E402


def test_cascade_end_to_end_through_the_cli(tmp_path):
    "Five 3d_lowres folds (a tiny budget), then the cascade: its first conv takes CT + 2 one-hot channels."
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=5, n_test=1, n_classes=2, shape=(32, 48, 48),
                                 progress=False)
    pre = tmp_path / 'pre'
    assert nnlite('plan', raw, '-o', pre, '--gpu-memory', 0.03, '-q').returncode == 0
    assert nnlite('preprocess', raw, pre, '-c', '3d_lowres', '3d_fullres', '-np', 1, '-q').returncode == 0
    short = ('--epochs', 1, '--iters', 2, '--val-iters', 0, '-q')

    r = nnlite('train', pre, '-c', '3d_cascade_fullres', '-f', 0, *short)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'no 3d_lowres prediction of case' in r.stderr and '-c 3d_lowres -f' in r.stderr

    for fold in range(5):
        r = nnlite('train', pre, '-c', '3d_lowres', '-f', fold, *short)
        assert r.returncode == 0, r.stderr
    handed_on = pre / 'results' / '3d_lowres' / 'predicted_next_stage' / '3d_cascade_fullres'
    assert sorted(p.stem for p in handed_on.glob('*.npy')) == [f'case_{i:03d}' for i in range(5)]

    r = nnlite('train', pre, '-c', '3d_cascade_fullres', '-f', 0, *short)
    assert r.returncode == 0, r.stderr
    model = pre / 'results' / '3d_cascade_fullres'
    weights = load_checkpoint(model / 'fold_0' / 'checkpoint_final.pth')['network_weights']
    assert weights['encoder.stages.0.0.convs.0.conv.weight'].shape[1] == 1 + 2

    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'predicted', '-m', model,
               '--no-mirroring', '-q')
    assert r.returncode == 0, r.stderr
    first_stage = f"cascade: the first stage, {pre / 'results' / '3d_lowres'} (3d_lowres, folds 0, 1, 2, 3, 4"
    assert first_stage in r.stdout, r.stdout
    predicted, geometry = read_label(tmp_path / 'predicted' / 'test_000.nii.gz')
    truth, truth_geometry = read_label(raw / 'labelsTs' / 'test_000.nii.gz')
    assert predicted.shape == truth.shape and geometry == truth_geometry
    assert set(np.unique(predicted)) <= {0, 1, 2}

    splits = json.loads((pre / 'splits_final.json').read_text())
    missing = splits[1]['val'][0]
    (handed_on / f'{missing}.npy').unlink()
    r = nnlite('train', pre, '-c', '3d_cascade_fullres', '-f', 2, *short)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f'no 3d_lowres prediction of case {missing}' in r.stderr and '-c 3d_lowres -f 1' in r.stderr
