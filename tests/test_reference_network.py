"""The U-Net against nnU-Net v2's PlainConvUNet (dynamic_network_architectures) built from the same plans:
parameter counts, output shapes, and — with the reference's weights loaded — the same outputs."""
import json

import pytest
import torch

from nnunet_lite.fingerprint import extract_fingerprint
from nnunet_lite.network import (build_network, count_parameters, load_reference_weights, n_outputs,
                                 reference_state_dict)
from nnunet_lite.plans import Configuration, plan_experiment

from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402


def our_network(plans, configuration, dataset_json, deep_supervision=True, initialise=True):
    config = Configuration.from_plans(plans, configuration, dataset_json)
    return build_network(config, dataset_json, deep_supervision, initialise)


def reference_network(plans, configuration, dataset_json, deep_supervision=True):
    arch = plans['configurations'][configuration]['architecture']
    lm = LabelManager(dataset_json['labels'], dataset_json.get('regions_class_order'))
    return get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'],
                                  arch['_kw_requires_import'], len(dataset_json['channel_names']),
                                  lm.num_segmentation_heads, allow_init=True,
                                  deep_supervision=deep_supervision)


@pytest.fixture(scope='module')
def all_plans(datasets):
    out = []
    for kind in ('ct', 'mr', 'ct_aniso', 'mr_aniso', 'ct2d'):
        dataset_json = json.loads((datasets[kind] / 'dataset.json').read_text())
        fp = extract_fingerprint(datasets[kind], progress=False)
        for gpu in (8, 24):
            plans = plan_experiment(fp, dataset_json, gpu_memory_gb=gpu)
            for name, cfg in plans['configurations'].items():
                if 'architecture' in cfg: out.append((f'{kind}-{gpu}GB-{name}', plans, name, dataset_json))
    return out


def test_parameter_counts_and_shapes_equal_reference(all_plans):
    assert len(all_plans) >= 10
    for tag, plans, name, dataset_json in all_plans:
        ours, theirs = our_network(plans, name, dataset_json), reference_network(plans, name, dataset_json)
        assert count_parameters(ours) == count_parameters(theirs), tag
        assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()], tag
        patch = plans['configurations'][name]['patch_size']
        x = torch.randn(1, len(dataset_json['channel_names']),
                        *[min(p, 64) if i else p for i, p in enumerate(patch)])
        if len(patch) == 3 and x[0, 0].numel() > 64 ** 3: continue   # shapes only where affordable on CPU
        with torch.no_grad():
            ours_out, theirs_out = ours(x), theirs(x)
        assert [o.shape for o in ours_out] == [t.shape for t in theirs_out], tag


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_same_weights_same_outputs(all_plans, deep_supervision):
    tag, plans, name, dataset_json = next(p for p in all_plans if p[0].startswith('ct_aniso-8GB-3d_fullres'))
    theirs = reference_network(plans, name, dataset_json, deep_supervision).eval()
    ours = our_network(plans, name, dataset_json, deep_supervision, initialise=False)
    ours = load_reference_weights(ours, theirs.state_dict()).eval()
    x = torch.randn(2, 1, *plans['configurations'][name]['patch_size'])
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    a, b = (a, b) if deep_supervision else ([a], [b])
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_output_channels_equal_label_manager():
    for labels in ({'background': 0, 'a': 1, 'b': 2}, {'background': 0, 'a': 1, 'ignore': 2},
                   {'background': 0, 'whole': [1, 2, 3], 'core': [2, 3], 'enh': 3}):
        order = [1, 2, 3] if any(isinstance(v, list) for v in labels.values()) else None
        assert n_outputs({'labels': labels}) == LabelManager(labels, order).num_segmentation_heads


def test_wrong_weights_are_refused(all_plans):
    tag, plans, name, dataset_json = all_plans[0]
    net = our_network(plans, name, dataset_json)
    sd = reference_network(plans, name, dataset_json).state_dict()
    sd.pop('decoder.seg_layers.0.bias')
    with pytest.raises(KeyError, match='decoder.seg_layers.0.bias'):
        load_reference_weights(net, sd)


def test_reference_network_loads_our_weights(all_plans):
    "reference_state_dict: PlainConvUNet loads it strictly (every key and alias) and computes our outputs."
    for tag, plans, name, dataset_json in [p for p in all_plans if p[0].endswith(('3d_fullres', '2d'))][:4]:
        ours = our_network(plans, name, dataset_json).eval()
        theirs = reference_network(plans, name, dataset_json).eval()
        theirs.load_state_dict(reference_state_dict(ours), strict=True)
        patch = plans['configurations'][name]['patch_size']
        x = torch.randn(1, len(dataset_json['channel_names']), *patch)
        with torch.no_grad():
            for u, v in zip(ours(x), theirs(x)): torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
