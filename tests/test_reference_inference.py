"""Sliding-window pieces against nnU-Net v2's own functions: tile steps, the Gaussian, padding, and the whole
sliding window (with mirroring) of the reference predictor on the same network weights."""
import itertools

import pytest
import torch

from nnunet_lite.inference import (gaussian_importance, pad_to_patch, sliding_window_predict,
                                   sliding_window_steps)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from acvl_utils.cropping_and_padding.padding import pad_nd_image  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import (  # noqa: E402
    compute_gaussian, compute_steps_for_sliding_window)


@pytest.mark.parametrize("step", [0.5, 0.25, 0.33, 0.7, 1.0])
def test_steps_equal_reference(step):
    for image, patch in itertools.product([64, 65, 96, 110, 127, 128, 200, 333], [32, 48, 64, 96]):
        if image < patch: continue
        theirs = compute_steps_for_sliding_window((image,), (patch,), step)
        assert sliding_window_steps([image], [patch], step) == theirs


@pytest.mark.parametrize("patch",
                         [(64, 64), (40, 56, 40), (28, 256, 224), (128, 128, 128), (5, 160, 192), (31, 33)])
def test_gaussian_equals_reference(patch):
    ours = gaussian_importance(patch)
    theirs = compute_gaussian(tuple(patch), 1 / 8, 10, dtype=torch.float32, device=torch.device('cpu'))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    compute_gaussian.cache_clear()
    half = compute_gaussian(tuple(patch), 1 / 8, 10, dtype=torch.float16, device=torch.device('cpu'))
    torch.testing.assert_close(gaussian_importance(patch, dtype=torch.float16), half, rtol=1e-3, atol=0)


@pytest.mark.parametrize("shape,patch",
                         [((2, 10, 20, 30), (16, 16, 16)), ((1, 40, 9), (32, 32)), ((3, 5, 6, 7), (5, 6, 7)),
                                          ((1, 3, 64, 50), (64, 64))])
def test_padding_equals_reference(shape, patch):
    x = torch.randn(shape)
    ours, undo = pad_to_patch(x, patch)
    theirs, slicer = pad_nd_image(x, patch, 'constant', {'value': 0}, True, None)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[undo], theirs[tuple(slicer)])


def reference_predictor(plans, configuration, dataset_json, network, mirror_axes, step=0.5):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=bool(mirror_axes),
                                perform_everything_on_device=False, device=torch.device('cpu'), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, pm, pm.get_configuration(configuration), [network.state_dict()],
                                    dataset_json, 'nnUNetTrainer', tuple(mirror_axes))
    return predictor


@pytest.mark.parametrize("kind,configuration,shape,preset", [
    ('ct', '3d_fullres', (30, 41, 37), 'v2'), ('ct2d', '2d', (1, 70, 51), 'v2'),
    ('ct', '3d_fullres', (8, 12, 10), 'v2'), ('ct', '3d_fullres', (14, 25, 22), 'resenc_m')])
def test_sliding_window_equals_reference_predictor(kind, configuration, shape, preset, datasets):
    "Same weights, same preprocessed image: our logits equal the reference's (which accumulates in float16)."
    import json
    from nnunet_lite.fingerprint import extract_fingerprint
    from nnunet_lite.network import build_network, reference_state_dict
    from nnunet_lite.plans import Configuration, plan_experiment
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    dataset_json = json.loads((datasets[kind] / 'dataset.json').read_text())
    plans = plan_experiment(extract_fingerprint(datasets[kind], progress=False), dataset_json, preset=preset)
    torch.manual_seed(0)
    config = Configuration.from_plans(plans, configuration, dataset_json)
    ours = build_network(config, dataset_json, deep_supervision=False).eval()
    arch = plans['configurations'][configuration]['architecture']
    theirs = get_network_from_plans(arch['network_class_name'], arch['arch_kwargs'],
                                    arch['_kw_requires_import'], 1, len(dataset_json['labels']),
                                    deep_supervision=False).eval()
    theirs.load_state_dict(reference_state_dict(ours))
    patch = plans['configurations'][configuration]['patch_size']
    mirror = (0, 1) if len(patch) == 2 else (0, 1, 2)
    data = torch.randn(1, *shape)
    predictor = reference_predictor(plans, configuration, dataset_json, theirs, mirror)
    ref = predictor.predict_sliding_window_return_logits(data)
    # float16 sums, as the reference's
    same = sliding_window_predict(ours, data, patch, 0.5, mirror, accumulate_dtype=torch.float16)
    assert same.shape == ref.shape
    torch.testing.assert_close(same, ref.float(), rtol=2e-3, atol=2e-3)
    # float32 sums (our CPU default): nearly the same
    exact = sliding_window_predict(ours, data, patch, 0.5, mirror)
    assert (exact.argmax(0) == ref.argmax(0)).float().mean() > 0.99
