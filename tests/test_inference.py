"""Prediction as a user runs it: outputs on the input's grid (anisotropic, transposed, cropped, 2D, several
channels), folders resumed, bad input refused in one line, the `nnlite predict` command, region models."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_lite.plans import plan_dataset
from nnunet_lite.data import make_synthetic_dataset, read_image, read_label, write_image
from nnunet_lite.data import held_out_cases
from nnunet_lite.inference import Predictor
from nnunet_lite.preprocessing import preprocess_dataset, revert
from nnunet_lite.training import Trainer

from cli_runner import nnlite


def briefly_trained(root: Path, kind: str, configuration: str, **synth) -> tuple[Path, Path]:
    "(raw dataset, model folder) of a model trained for one short epoch (enough to test the plumbing)."
    raw = make_synthetic_dataset(root / 'raw', kind, n_train=3, n_test=2, progress=False, **synth)
    plans = plan_dataset(raw, root / 'pre', progress=False)
    preprocess_dataset(raw, plans, configuration, root / 'pre', progress=False)
    trainer = Trainer(root / 'pre', configuration, 'all', epochs=1, iterations=1, val_iterations=0,
                      progress=False).fit()
    return raw, trainer.output_dir.parent


@pytest.mark.parametrize("kind,configuration,synth", [
    ('ct_aniso', '3d_fullres', dict(shape=(6, 24, 24))),
    ('mr_aniso', '3d_fullres', dict(shape=(24, 24, 6), spacing=(0.8, 0.8, 5.0))),  # coarse last: transposed
    ('mr', '3d_fullres', dict(shape=(12, 20, 20))),                                # 2 channels, cropped
    ('ct2d', '2d', dict(shape=(32, 40))),
])
def test_prediction_is_on_the_input_grid(tmp_path, kind, configuration, synth):
    raw, model = briefly_trained(tmp_path, kind, configuration, **synth)
    predictor = Predictor(model, progress=False)
    written = predictor.predict_folder(raw / 'imagesTs', tmp_path / 'out', save_probabilities=True).written
    assert len(written) == 2
    for case, files in held_out_cases(raw).items():
        image, geometry = read_image(files)
        ending = predictor.dataset_json["file_ending"]
        label, label_geometry = read_label(tmp_path / 'out' / f'{case}{ending}')
        assert label.shape == image.shape[1:] and label_geometry == geometry
        probabilities = np.load(tmp_path / 'out' / f'{case}.npz')['probabilities']
        assert probabilities.shape == (predictor.n_outputs, *image.shape[1:])
        np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=3e-3)
        argmax = probabilities.argmax(0)
        assert np.array_equal(argmax, label) or (argmax == label).mean() > 0.999
    assert (tmp_path / 'out' / 'plans.json').exists()


def test_folder_redoes_or_continues_and_refuses_bad_input(tmp_path):
    """As nnUNetv2_predict: existing outputs are redone; with continue_prediction kept, but only those the
    same weights and settings made (a record per case says what made it)."""
    raw, model = briefly_trained(tmp_path, 'ct', '3d_fullres', shape=(12, 20, 20))
    predictor = Predictor(model, progress=False)
    out = tmp_path / 'out'
    first = predictor.predict_folder(raw / 'imagesTs', out).written
    stamp = first[0].stat().st_mtime_ns
    again = predictor.predict_folder(raw / 'imagesTs', out, continue_prediction=True)
    assert again.written == [] and again.kept == first and first[0].stat().st_mtime_ns == stamp
    assert again.summary() == '0 case(s) predicted, 2 kept (same model and settings)'
    redone = predictor.predict_folder(raw / 'imagesTs', out)                 # the default: redo
    assert len(redone.written) == 2 and redone.summary().endswith('existing outputs redone: 2 overwritten')
    (out / '.prediction_records' / 'test_001.json').unlink()               # made by someone else
    with torch.no_grad(): next(predictor.networks[0].parameters()).add_(0.01)   # the model changed
    run = predictor.predict_folder(raw / 'imagesTs', out, continue_prediction=True)
    assert run.redone == {'test_000': 'made by other weights', 'test_001': 'no record of how it was made'}
    probabilities = predictor.predict_folder(raw / 'imagesTs', out, save_probabilities=True,
                                             continue_prediction=True)
    assert set(probabilities.redone.values()) == {'no CASE.npz'}
    image, geometry = read_image(raw / 'imagesTs' / 'test_000_0000.nii.gz')
    # two channels, where the model wants one
    write_image(np.concatenate([image, image]), geometry, tmp_path / 'two', 'case_000')
    with pytest.raises(Exception, match='case_000 has channels \\[0, 1\\], the model expects \\[0\\]'):
        predictor.predict_folder(tmp_path / 'two', tmp_path / 'out2')
    with pytest.raises(FileNotFoundError, match='no images'):
        predictor.predict_folder(tmp_path / 'nowhere', tmp_path / 'out3')


def test_cli_predict_parts_workers_and_continue(tmp_path):
    raw, model = briefly_trained(tmp_path, 'ct', '3d_fullres', shape=(12, 20, 20))
    common = ('-m', model, '--device', 'cpu', '-q', '-npp', 2, '-nps', 2)
    for part in (0, 1):
        r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'parts', *common, '--num-parts', 2,
                   '--part-id', part)
        assert r.returncode == 0, r.stderr
        assert f'1 case(s) predicted (part {part} of 2)' in r.stdout, r.stdout
    whole = tmp_path / 'whole'
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', whole, *common)
    assert r.returncode == 0, r.stderr
    for name in ('test_000.nii.gz', 'test_001.nii.gz'):
        assert np.array_equal(read_label(whole / name)[0], read_label(tmp_path / 'parts' / name)[0])
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', whole, *common, '--continue')
    assert '0 case(s) predicted, 2 kept (same model and settings)' in r.stdout, r.stdout
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', whole, *common, '--continue', '--step', 0.25)
    assert 'existing outputs redone: 2 made with step 0.5, now 0.25' in r.stdout, r.stdout
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', whole, *common, '--num-parts', 2, '--part-id', 2)
    assert r.stderr.strip() == 'nnlite: error: part_id 2 is not one of the 2 parts (0 to 1)'
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', whole, '-m', model, '--device', 'cuda:3', '-q')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and '--device cuda:3' in r.stderr


def test_a_checkpoint_is_checked_against_its_model_folder(tmp_path):
    "A fold of another configuration or trained with other plans is refused in one line naming it."
    import shutil
    from nnunet_lite.training import load_checkpoint, save_checkpoint
    raw, model = briefly_trained(tmp_path, 'ct', '3d_fullres', shape=(12, 20, 20))
    path = model / 'fold_all' / 'checkpoint_final.pth'
    checkpoint = load_checkpoint(path)
    elsewhere = tmp_path / 'results' / '2d'
    shutil.copytree(model, elsewhere)
    with pytest.raises(ValueError, match='a checkpoint of 3d_fullres in the model folder of 2d'):
        Predictor(elsewhere, progress=False)
    plans = json.loads(json.dumps(checkpoint['init_args']['plans']))
    plans['configurations']['3d_fullres']['spacing'] = [9.0, 9.0, 9.0]
    save_checkpoint(path, {**checkpoint, 'init_args': {**checkpoint['init_args'], 'plans': plans}})
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'p', '-m', model, '-q')
    assert r.returncode == 1 and r.stderr.startswith(f'nnlite: error: {path}: trained with another spacing')
    assert not (tmp_path / 'p').exists()


def test_export_runs_on_the_prediction_device(tmp_path, monkeypatch):
    """The logits reach `revert` (resampling back to the input's grid, softmax, argmax) as a tensor on the
    predictor's device, never copied to numpy first: on a GPU the export runs on the GPU. The device is a
    parameter, so the same code path is tested here on the CPU."""
    import nnunet_lite.inference as inference
    raw, model = briefly_trained(tmp_path, 'ct', '3d_fullres', shape=(12, 20, 20))
    seen = []
    def spy(logits, *args, **kwargs):
        seen.append((type(logits), logits.device))
        return revert(logits, *args, **kwargs)
    monkeypatch.setattr(inference, 'revert', spy)
    predictor = Predictor(model, device='cpu', progress=False)
    assert len(predictor.predict_folder(raw / 'imagesTs', tmp_path / 'out').written) == 2
    assert seen == [(torch.Tensor, predictor.device)] * 2


def test_fold_ensemble_and_cli(tmp_path):
    raw, model = briefly_trained(tmp_path, 'ct', '3d_fullres', shape=(12, 20, 20))
    fold_all = model / 'fold_all'
    # a second "fold" with the same weights: the ensemble equals one fold
    os.symlink(fold_all, model / 'fold_0')
    one = Predictor(model, folds=['all'], progress=False)
    both = Predictor(model, progress=False)
    assert both.folds == [0, 'all']
    image, geometry = read_image(held_out_cases(raw)['test_000'])
    a, pa = one.predict_array(image, geometry, return_probabilities=True)
    b, pb = both.predict_array(image, geometry, return_probabilities=True)
    assert np.array_equal(a, b) and np.allclose(pa, pb, atol=1e-5)
    soft = Predictor(model, fold_merge='softmax', progress=False).predict_array(image, geometry, True)[1]
    assert np.allclose(soft, pa, atol=1e-4)
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'cli', '-m', model, '-f', 'all',
               '--no-mirroring', '--step', 1, '-q')
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / 'cli').glob('*.nii.gz'))
    assert written == ['test_000.nii.gz', 'test_001.nii.gz']
    r = nnlite('predict', '-i', raw / 'imagesTs', '-o', tmp_path / 'x', '-m', tmp_path / 'no_model', '-q')
    assert r.returncode == 1 and r.stderr.startswith('nnlite: error:') and 'no such model folder' in r.stderr


def test_region_models_paint_labels_in_order():
    "revert for regions: sigmoid per region, each region above 0.5 paints its label in regions_class_order."
    props = {'shape_after_resampling': [1, 2, 3], 'shape_after_cropping_and_before_resampling': [1, 2, 3],
             'spacing_after_resampling': [1.0, 1.0, 1.0], 'spacing_before_resampling': [1.0, 1.0, 1.0],
             'shape_before_cropping': [1, 2, 4], 'bbox_used_for_cropping': [[0, 1], [0, 2], [1, 4]],
             'transpose_backward': [0, 1, 2]}
    big = 10.0
    whole = torch.tensor([[[[big, big, big], [big, -big, -big]]]])     # region 'whole' = labels 1, 2, 3
    core = torch.tensor([[[[-big, big, big], [-big, -big, -big]]]])    # region 'core' = labels 2, 3
    enh = torch.tensor([[[[-big, -big, big], [-big, -big, -big]]]])    # region 'enhancing' = label 3
    label = revert(torch.cat([whole, core, enh]), props, regions_class_order=[1, 2, 3])
    assert label.tolist() == [[[0, 1, 2, 3], [0, 1, 0, 0]]]
