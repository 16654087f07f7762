"""Fine-tuning from pretrained weights against nnU-Net v2's own `load_pretrained_weights`: for the same
checkpoint files (ours and the reference's), both accept or both refuse, and both load the same weights (all
but the segmentation heads). A fine-tuned Trainer starts from the checkpoint's weights but its heads."""
import json
import re

import numpy as np
import pytest
import torch

from nnunet_lite.data import make_synthetic_dataset
from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.network import build_network, reference_state_dict
from nnunet_lite.plans import Configuration, plan_dataset, plan_experiment
from nnunet_lite.preprocessing import preprocess_dataset
from nnunet_lite.training import (HEAD_KEY, Trainer, load_checkpoint, load_pretrained_weights,
                                  save_checkpoint)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as reference_load  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402

CONFIG = '3d_fullres'


def with_classes(dataset_json: dict, n_foreground: int) -> dict:
    return {**dataset_json, 'labels': {'background': 0, **{f'c{i}': i for i in range(1, n_foreground + 1)}}}


def with_channels(plans: dict, dataset_json: dict, n: int) -> tuple[dict, dict]:
    "Plans and dataset.json of the same network with `n` input channels."
    plans = json.loads(json.dumps(plans))
    config = plans['configurations'][CONFIG]
    for key in ('normalization_schemes', 'use_mask_for_norm'): config[key] = config[key][:1] * n
    return plans, {**dataset_json, 'channel_names': {str(i): 'CT' for i in range(n)}}


def our_network(plans, dataset_json, seed):
    torch.manual_seed(seed)
    return build_network(Configuration.from_plans(plans, CONFIG, dataset_json), dataset_json)


def reference_network(plans, dataset_json, seed):
    torch.manual_seed(seed)
    arch = plans['configurations'][CONFIG]['architecture']
    labels = LabelManager(dataset_json['labels'], dataset_json.get('regions_class_order'))
    return get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'],
                                  arch['_kw_requires_import'], len(dataset_json['channel_names']),
                                  labels.num_segmentation_heads, allow_init=True, deep_supervision=True)


def reference_style_checkpoint(path, network):
    "What nnU-Net v2's trainer saves (its keys, numpy scalars in the log included)."
    save_checkpoint(path, {
        'network_weights': network.state_dict(), 'optimizer_state': {}, 'grad_scaler_state': None,
        'logging': {'mean_fg_dice': [np.float64(0.5)], 'ema_fg_dice': [np.float64(0.5)]},
        '_best_ema': np.float64(0.5), 'current_epoch': 1, 'init_args': {}, 'trainer_name': 'nnUNetTrainer',
        'inference_allowed_mirroring_axes': (0, 1, 2)})
    return path


@pytest.fixture(scope='module')
def plans(datasets):
    "{kind: (plans, dataset.json)} for the CT kinds: 'ct' is the target; 'ct_aniso' has another topology."
    out = {}
    for kind in ('ct', 'ct_aniso'):
        dataset_json = json.loads((datasets[kind] / 'dataset.json').read_text())
        fingerprint = extract_fingerprint(datasets[kind], progress=False)
        out[kind] = plan_experiment(fingerprint, dataset_json), dataset_json
    return out


@pytest.fixture(scope='module')
def checkpoints(plans, tmp_path_factory):
    """{name: (file, accepted?)}: each source network saved as our trainer saves it (reference names, from our
    network) and as nnU-Net v2's trainer does (from its own network)."""
    root = tmp_path_factory.mktemp('pretrained')
    target_plans, target_json = plans['ct']
    aniso_plans, aniso_json = plans['ct_aniso']
    assert (target_plans['configurations'][CONFIG]['architecture']
            != aniso_plans['configurations'][CONFIG]['architecture'])
    sources = {'same': (target_plans, target_json, True),
               'other_classes': (target_plans, with_classes(target_json, 5), True),
               'other_channels': (*with_channels(target_plans, target_json, 2), False),
               'other_topology': (aniso_plans, aniso_json, False)}
    out = {}
    for seed, (name, (p, dj, accepted)) in enumerate(sources.items(), start=10):
        ours = root / f'{name}_ours.pth'
        save_checkpoint(ours, {'network_weights': reference_state_dict(our_network(p, dj, seed))})
        out[f'{name}_ours'] = ours, accepted
        theirs = reference_style_checkpoint(root / f'{name}_theirs.pth', reference_network(p, dj, seed + 100))
        out[f'{name}_theirs'] = theirs, accepted
    return out


def load_both(plans, path):
    "(our network, the reference network, our error, the reference's error) after loading `path` into both."
    target_plans, target_json = plans['ct']
    ours = our_network(target_plans, target_json, 0)
    theirs = reference_network(target_plans, target_json, 1)
    theirs.load_state_dict(reference_state_dict(ours))          # both start from the same weights
    errors = []
    loaders = ((load_pretrained_weights, ours, ValueError), (reference_load, theirs, AssertionError))
    for load, net, kind in loaders:
        try:
            load(net, str(path)); errors.append(None)
        except kind as e:
            errors.append(e)
    return ours, theirs, *errors


@pytest.mark.parametrize('name', [f'{n}_{who}' for n in ('same', 'other_classes', 'other_channels',
                                                        'other_topology') for who in ('ours', 'theirs')])
def test_accepts_refuses_and_loads_as_the_reference(plans, checkpoints, name):
    path, accepted = checkpoints[name]
    before = {k: v.clone() for k, v in reference_state_dict(our_network(*plans['ct'], 0)).items()}
    ours, theirs, our_error, their_error = load_both(plans, path)
    assert (our_error is None) == (their_error is None) == accepted, (our_error, their_error)
    if not accepted:
        assert len(str(our_error).splitlines()) == 1 and str(our_error).startswith(f'{path}: ')
        shapes = re.search(r': (\S+) has shape (\(.*?\)) there and (\(.*?\)) in this network', str(our_error))
        missing = re.search(r': has no weight (\S+), which this network needs', str(our_error))
        assert shapes or missing, our_error
        assert HEAD_KEY not in (shapes or missing).group(1)
        assert missing or shapes.group(2) != shapes.group(3)
        return
    weights = load_checkpoint(path)['network_weights']
    theirs_now = theirs.state_dict()
    for k, v in reference_state_dict(ours).items():
        assert torch.equal(v, theirs_now[k]), k                 # the same weights as the reference loads
        assert torch.equal(v, before[k] if HEAD_KEY in k else weights[k]), k   # the heads are never loaded


def test_missing_weight_is_refused_by_both(plans, checkpoints, tmp_path):
    path, _ = checkpoints['same_ours']
    weights = dict(load_checkpoint(path)['network_weights'])
    gone = next(k for k in weights if k.startswith('decoder.transpconvs.'))
    del weights[gone]
    save_checkpoint(tmp_path / 'partial.pth', {'network_weights': weights})
    _, _, our_error, their_error = load_both(plans, tmp_path / 'partial.pth')
    assert our_error is not None and their_error is not None
    assert str(our_error) == (f"{tmp_path / 'partial.pth'}: has no weight {gone}, which this network needs "
                              f"(another architecture)")


@pytest.fixture(scope='module')
def tiny3d(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny3d_pretrained')
    raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=5, n_test=0, shape=(16, 24, 24), progress=False)
    plans_ = plan_dataset(raw, root / 'pre', progress=False)
    preprocess_dataset(raw, plans_, CONFIG, root / 'pre', progress=False)
    return root / 'pre'


def test_a_fine_tuned_trainer_starts_from_the_checkpoint_but_its_heads(tiny3d, tmp_path):
    short = dict(epochs=1, iterations=1, val_iterations=1, progress=False)
    source = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'source' / 'fold_0', **short).fit()
    checkpoint = source.output_dir / 'checkpoint_final.pth'
    tuned = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'tuned' / 'fold_0', seed=7,
                    pretrained_weights=checkpoint, **short)
    fresh = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fresh' / 'fold_0', seed=7, **short)
    weights, initial = load_checkpoint(checkpoint)['network_weights'], reference_state_dict(fresh.network)
    for k, v in reference_state_dict(tuned.network).items():
        assert torch.equal(v.cpu(), initial[k] if HEAD_KEY in k else weights[k]), k
    assert any(not torch.equal(initial[k], weights[k]) for k in initial if HEAD_KEY not in k)
    # the optimiser starts fresh; the run trains and says where it started
    assert not tuned.optimizer.state and tuned.epoch == 0
    tuned.fit()
    assert load_checkpoint(tuned.output_dir / 'checkpoint_final.pth')['pretrained_weights'] == str(checkpoint)
    with pytest.raises(ValueError, match='pretrained weights start a new run, they cannot be combined') as e:
        Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'tuned' / 'fold_0', pretrained_weights=checkpoint,
                **short).fit(resume=True)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(FileNotFoundError, match='nothing.pth: no such checkpoint'):
        Trainer(tiny3d, CONFIG, 0, pretrained_weights=tmp_path / 'nothing.pth', **short)
