"""A ResEnc M model through the command line, as a user runs it: plan with `--preset resenc_m`, preprocess,
train a fold of 2d and of 3d_fullres (residual encoders), pick the best with `find-best`, predict new images
with its instructions; nnU-Net v2's names on every file."""
import json

import numpy as np

from nnunet_lite.data import make_synthetic_dataset, read_image, read_label
from nnunet_lite.training import load_checkpoint

from cli_runner import nnlite, ok  # noqa: E402


def test_resenc_m_train_and_predict_through_the_cli(tmp_path):
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=5, n_test=2, n_classes=2, shape=(12, 24, 24),
                                 progress=False)
    pre, results = tmp_path / 'pre', tmp_path / 'pre' / 'results'
    r = ok(nnlite('plan', raw, '-o', pre, '--preset', 'resenc_m', '-q'))
    assert 'nnUNetResEncUNetMPlans (ResidualEncoderUNet)' in r.stdout
    plans = json.loads((pre / 'plans.json').read_text())
    assert plans['plans_name'] == 'nnUNetResEncUNetMPlans'
    for name in ('2d', '3d_fullres'):
        arch = plans['configurations'][name]['architecture']
        assert arch['network_class_name'].endswith('.ResidualEncoderUNet')
        assert arch['arch_kwargs']['n_blocks_per_stage'][:2] == [1, 3]

    ok(nnlite('preprocess', raw, pre, '-c', '2d', '3d_fullres', '-np', 1, '-q'))
    short = ('--epochs', 1, '--iters', 2, '--val-iters', 1, '--device', 'cpu', '-q')
    for name in ('2d', '3d_fullres'):
        ok(nnlite('train', pre, '-c', name, '-f', 0, '--npz', *short))
        weights = load_checkpoint(results / name / 'fold_0' / 'checkpoint_final.pth')['network_weights']
        assert 'encoder.stem.convs.0.conv.weight' in weights
        assert 'encoder.stages.1.blocks.2.conv2.norm.weight' in weights

    r = ok(nnlite('find-best', results, '-f', 0, '-q'))
    info = json.loads((results / 'inference_instructions.json').read_text())
    assert list(info['all_results']) == ['2d', '3d_fullres', 'ensemble___2d___3d_fullres___0']

    out = tmp_path / 'predicted'
    ok(nnlite('predict', '-i', raw / 'imagesTs', '-o', out, '-m', results / 'inference_instructions.json',
              '--device', 'cpu', '-q'))
    for case in ('test_000', 'test_001'):
        _, image_geometry = read_image([raw / 'imagesTs' / f'{case}_0000.nii.gz'])
        label, geometry = read_label(out / f'{case}.nii.gz')
        assert geometry == image_geometry and set(np.unique(label)) <= {0, 1, 2}


def test_resenc_plans_share_the_default_plans_preprocessed_data(tmp_path):
    "3d_fullres preprocessed for v2 is reused as it is for resenc_m (the same data identifier and settings)."
    from nnunet_lite.plans import plan_dataset
    from nnunet_lite.preprocessing import preprocess_dataset
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=3, n_test=0, shape=(12, 20, 20),
                                 progress=False)
    v2 = plan_dataset(raw, tmp_path / 'pre', progress=False)
    folder = preprocess_dataset(raw, v2, '3d_fullres', tmp_path / 'pre', progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob('case_*')}
    resenc = plan_dataset(raw, tmp_path / 'pre', preset='resenc_m', progress=False, check=False)
    identifier = v2['configurations']['3d_fullres']['data_identifier']
    assert resenc['configurations']['3d_fullres']['data_identifier'] == identifier
    preprocess_dataset(raw, resenc, '3d_fullres', tmp_path / 'pre', progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob('case_*')} == before
