"""The 3D cascade's pieces against nnU-Net v2 and batchgeneratorsv2: the structuring element and the binary
morphology of the previous stage's degradation, the one-hot layout of its input channels, the statistics of
the random degradations, the first stage's hand-over (logits to the next stage's grid), the previous stage's
channels in (unaugmented) batches against the reference's data loader and validation transforms, and a
checkpoint of ours for 3d_cascade_fullres predicted by the reference's nnUNetPredictor."""
import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnunet_lite.dataloading as dataloading
from nnunet_lite.augmentation import (BINARY_OPERATORS, ball, random_binary_operator, remove_random_component,
                                      training_targets, with_previous_stage)
from nnunet_lite.inference import cascade_input

from reference_oracle import require_reference  # noqa: E402
require_reference()
import skimage.measure  # noqa: E402
import skimage.morphology  # noqa: E402
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import (  # noqa: E402
    ApplyRandomBinaryOperatorTransform, binary_closing_torch, binary_dilation_torch, binary_erosion_torch,
    binary_opening_torch)
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (  # noqa: E402
    RemoveRandomConnectedComponentFromOneHotEncodingTransform)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.random import RandomTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot  # noqa: E402

REFERENCE_OPERATORS = {'dilation': binary_dilation_torch, 'erosion': binary_erosion_torch,
                       'closing': binary_closing_torch, 'opening': binary_opening_torch}


@contextlib.contextmanager
def quiet():
    "The reference prints progress and warns about CPU-only settings; keep the test output clean."
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def smooth_mask(shape, seed, fraction=0.4):
    "A random 3D mask of blobs (smooth noise thresholded at a quantile), touching the patch borders."
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(1, 1, *[max(2, s // 4) for s in shape], generator=g)
    field = F.interpolate(field, size=list(shape), mode='trilinear', align_corners=False)[0, 0]
    field += 0.3 * torch.randn(shape, generator=g)            # ragged edges and a few stray voxels
    return field > torch.quantile(field.flatten(), 1 - fraction)


# ------------------------------------------------------------------------------------------------------------
# 1, 2: the structuring element and the morphology (deterministic, exact)
# ------------------------------------------------------------------------------------------------------------



def skimage_ball(radius, device=None):
    "The reference's structuring element (ApplyRandomBinaryOperatorTransform calls skimage.morphology.ball)."
    return torch.from_numpy(skimage.morphology.ball(radius, dtype=bool)).to(device)


@pytest.mark.parametrize("radius,side", [(2.0, 5), (1.5, 4)])
def test_ball_equals_skimage(radius, side):
    "A ball of odd and one of even side (a half-integer radius): the shape by hand, the voxels as skimage's."
    theirs = skimage.morphology.ball(radius, dtype=bool)
    ours = ball(radius).numpy()
    assert ours.shape == theirs.shape == (side, side, side)
    np.testing.assert_array_equal(ours, theirs)


def test_ball_equals_skimage_at_every_radius():
    "Every radius on a 0.001 grid over the reference's strel_size range (1, 8)."
    differing = []
    for radius in np.round(np.linspace(1, 8, 7001)[:-1], 6):
        ours, theirs = ball(float(radius)).numpy(), skimage.morphology.ball(float(radius), dtype=bool)
        if ours.shape != theirs.shape or (ours != theirs).any():
            differing.append((float(radius),
                              int((ours != theirs).sum()) if ours.shape == theirs.shape else 'shape'))
    assert not differing, f"{len(differing)} of 7000 radii differ, e.g. {differing[:5]}"


@pytest.mark.parametrize("name", list(BINARY_OPERATORS))
@pytest.mark.parametrize("radius", [1.0, 1.5, 6.49, 7.9])    # ball sides 3, 4, 13, 16
def test_binary_operators_equal_reference(name, radius):
    """Every operator, on masks that touch the border (erosion: outside counts as foreground), with small and
    large balls of odd and even side: both get skimage's ball, so that only the morphology is compared (the
    ball: see the tests above)."""
    strel = skimage_ball(radius)
    for seed in range(3):
        mask = smooth_mask((20, 24, 28), seed, fraction=[0.15, 0.4, 0.7][seed])
        theirs = REFERENCE_OPERATORS[name](mask.clone(), strel)
        ours = BINARY_OPERATORS[name](mask.clone(), strel)
        assert ours.dtype == torch.bool and ours.shape == mask.shape
        differ = (ours != theirs).sum().item()
        assert differ == 0, f"{name} r={radius} seed {seed}: {differ} voxels differ"
        if name != 'closing' or radius < 7:          # the operator did something (else this proves little)
            assert (theirs != mask).any()


# ------------------------------------------------------------------------------------------------------------
# 3: the one-hot layout of the previous stage's channels
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [[1, 2], [1, 2, 3], [1, 3]])
def test_previous_stage_onehot_layout_equals_reference(labels):
    """with_previous_stage(generator=None) (our validation path) against RemoveLabelTansform(-1, 0) then
    MoveSegAsOneHotToDataTransform(source_channel_idx=1, ...) per sample (the reference's validation
    transforms of a cascade). Ours returns the label channel *with* -1 still in it (training_targets turns it
    into 0 later, before the loss sees it); the reference has already made it 0. So ours is compared after
    training_targets."""
    g = torch.Generator().manual_seed(len(labels))
    shape = (3, 10, 12, 9)
    data = torch.randn(shape[0], 2, *shape[1:], generator=g)                   # two image channels
    gt = torch.randint(-1, max(labels) + 1, (shape[0], 1, *shape[1:]), generator=g).to(torch.int16)
    prev = torch.randint(-1, max(labels) + 1, (shape[0], 1, *shape[1:]), generator=g).to(torch.int16)
    seg = torch.cat([gt, prev], 1)
    ours_data, ours_label, drawn = with_previous_stage(data, seg, labels)
    assert drawn == {}
    assert ours_data.shape == (shape[0], 2 + len(labels), *shape[1:]) and ours_data.dtype == torch.float32
    assert ours_label.shape == gt.shape and torch.equal(ours_label, gt)        # -1 kept here
    transforms = [RemoveLabelTansform(-1, 0),
                  MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=labels,
                                                 remove_channel_from_source=True)]
    for i in range(shape[0]):
        d = {'image': data[i].clone(), 'segmentation': seg[i].clone()}
        for t in transforms:
            d = t(**d)
        assert torch.equal(ours_data[i], d['image']), f"sample {i}: data differs"
        assert torch.equal(training_targets(ours_label[i:i + 1])[0], d['segmentation'])
    # the prediction path: cascade_input against the reference predictor's convert_labelmap_to_one_hot, vstack
    image, label_map = data[0].numpy(), prev[0, 0].numpy()
    theirs = np.vstack((image, convert_labelmap_to_one_hot(label_map, labels, image.dtype)))
    ours = cascade_input(image, label_map, labels)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), theirs)


# ------------------------------------------------------------------------------------------------------------
# 4: the random degradations (training only): statistics against the reference's transforms, exact replays
# ------------------------------------------------------------------------------------------------------------

PATCH = 24
LIMIT = 0.15 * PATCH ** 3            # 2073.6 voxels: components at least this big are never removed


def degradation_sample():
    """An image channel and one-hot channels of 2 labels on a 24³ patch: label 1 is a big blob (2744 voxels,
    > 15 % of the patch, never removable) and two stray islands (8 and 27 voxels); label 2 a small blob (125)
    with one voxel touching it only at a corner (one 26-connected component of 126, two 6-connected ones)."""
    lab = torch.zeros(PATCH, PATCH, PATCH, dtype=torch.int16)
    lab[2:16, 3:17, 4:18] = 1
    lab[19:21, 19:21, 2:4] = 1
    lab[2:5, 19:22, 19:22] = 1
    lab[17:22, 3:8, 12:17] = 2
    lab[22, 8, 17] = 2
    onehot = torch.stack([lab == 1, lab == 2]).float()
    image = torch.randn(1, PATCH, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
    return image, onehot


def removable_components(onehot):
    "{(channel, frozenset of flat voxel indices)} of the 26-connected components under the reference's 15 %."
    out = set()
    for c in range(onehot.shape[0]):
        lab = skimage.measure.label(onehot[c].bool().numpy(), connectivity=3)
        for k in range(1, lab.max() + 1):
            where = np.flatnonzero(lab == k)
            if len(where) < LIMIT:
                out.add((c, frozenset(where.tolist())))
    return out


def removed_components(before, after):
    "What a sample lost: {(channel, frozenset of flat voxel indices)}; the channels must only lose voxels."
    assert not ((after > 0) & (before == 0)).any(), "component removal added voxels"
    lost = (before > 0) & (after == 0)
    return {(c, frozenset(torch.nonzero(lost[c].flatten())[:, 0].tolist())) for c in range(before.shape[0])
            if lost[c].any()}


N_DRAWS = 2000     # per side; every statistic below gets a tolerance of about 4 standard errors at this size


def binomial_tolerance(p, n=N_DRAWS, sides=2):
    "4 standard errors of a difference of `sides` independent binomial fractions (1: of one fraction vs. p)."
    return 4 * np.sqrt(sides * p * (1 - p) / n)


def test_random_binary_operator_statistics_match_reference():
    """The reference's RandomTransform(ApplyRandomBinaryOperatorTransform(channel_idx=[-2, -1],
    strel_size=(1, 8), p_per_label=0.5), apply_probability=0.4) and our random_binary_operator, each N_DRAWS
    times on one sample: the fraction of samples whose one-hot channels changed (~0.4 · 0.75 · P(the
    operator changes something)) and the mean number of changed voxels of a changed sample (heavy-tailed:
    25 %, over 4 standard errors at ~600 changed samples per side), and a two-sample KS test on the
    changed-voxel counts."""
    from scipy.stats import ks_2samp
    image, onehot = degradation_sample()
    operator = ApplyRandomBinaryOperatorTransform(channel_idx=[-2, -1], strel_size=(1, 8), p_per_label=0.5)
    ref = RandomTransform(operator, apply_probability=0.4)
    torch.manual_seed(0); np.random.seed(0)
    theirs = []
    for _ in range(N_DRAWS):
        out = ref(image=torch.cat([image, onehot]).clone())['image']
        assert torch.equal(out[:1], image)                              # the image channel is never touched
        theirs.append(int((out[1:] != onehot).any(0).sum()))
    g, ours, applied = torch.Generator().manual_seed(0), [], []
    for _ in range(N_DRAWS // 100):
        out, drawn = random_binary_operator(onehot[None].expand(100, -1, -1, -1, -1).clone(), g)
        ours += (out != onehot[None]).any(1).flatten(1).sum(1).tolist()
        applied += drawn['applied'].tolist()
    theirs, ours = np.array(theirs), np.array(ours)
    p_applied = np.mean(applied)
    assert abs(p_applied - 0.4) < binomial_tolerance(0.4, sides=1), p_applied
    p_theirs, p_ours = (theirs > 0).mean(), (ours > 0).mean()
    # at most 0.4 · (1 - 0.5²) = 0.3: a sample changes only if a channel is chosen (and the operator acts)
    assert 0.2 < p_theirs < 0.3 + binomial_tolerance(0.3, sides=1)
    assert abs(p_ours - p_theirs) < binomial_tolerance(p_theirs), (p_ours, p_theirs)
    m_theirs, m_ours = theirs[theirs > 0].mean(), ours[ours > 0].mean()
    assert abs(m_ours / m_theirs - 1) < 0.25, (m_ours, m_theirs)
    assert ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.mark.parametrize("strel", [
    'skimage_ball',
    'our_ball'])
def test_random_binary_operator_replays_exactly_in_reference(strel, monkeypatch):
    """Each sample's drawn operations (channel, operator, radius), given to the reference transform's own
    _apply_to_image, give exactly our result: same morphology, same order, and voxels a channel gains are
    taken from the other channel. 'skimage_ball': our random_binary_operator with the reference's structuring
    element (all else ours); 'our_ball': entirely ours."""
    import nnunet_lite.augmentation as augmentation
    if strel == 'skimage_ball':
        monkeypatch.setattr(augmentation, 'ball', skimage_ball)
    image, onehot = degradation_sample()
    g = torch.Generator().manual_seed(1)
    out, drawn = random_binary_operator(onehot[None].expand(60, -1, -1, -1, -1).clone(), g, p=1.0)
    ref = ApplyRandomBinaryOperatorTransform(channel_idx=[-2, -1], strel_size=(1, 8), p_per_label=0.5)
    replayed = 0
    for i, operations in enumerate(drawn['operations']):
        params = {'apply_to_channels': [c - 2 for c, _, _ in operations],
                  'operators': [REFERENCE_OPERATORS[o] for _, o, _ in operations],
                  'strel_size': [r for _, _, r in operations]}
        theirs = ref._apply_to_image(torch.cat([image, onehot]).clone(), **params)
        assert torch.equal(out[i], theirs[1:]), f"sample {i}: {operations}"
        replayed += len(operations)
    names = {o for ops in drawn['operations'] for _, o, _ in ops}
    assert names == set(BINARY_OPERATORS) and replayed > 40


def test_remove_random_component_statistics_match_reference():
    """The reference's RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
    channel_idx=[-2, -1], fill_with_other_class_p=0, dont_do_if_covers_more_than_x_percent=0.15,
    p_per_label=0.5), apply_probability=0.2) and our remove_random_component, N_DRAWS times each on one
    sample. Both channels have a removable component, so a sample changes with 0.2 · (1 - 0.5²) = 0.15.
    Every removal is one whole 26-connected component under 15 % of the patch; both remove the same set of
    components (the big blob never), at matching frequencies."""
    image, onehot = degradation_sample()
    removable = removable_components(onehot)
    assert len(removable) == 3                                            # two islands, the 126-voxel blob
    ref = RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
        channel_idx=[-2, -1], fill_with_other_class_p=0, dont_do_if_covers_more_than_x_percent=0.15,
        p_per_label=0.5), apply_probability=0.2)
    torch.manual_seed(0); np.random.seed(0)
    theirs = []
    for _ in range(N_DRAWS):
        out = ref(image=torch.cat([image, onehot]).clone())['image']
        theirs.append(removed_components(onehot, out[1:]))
    g, ours = torch.Generator().manual_seed(0), []
    for _ in range(N_DRAWS // 100):
        out, drawn = remove_random_component(onehot[None].expand(100, -1, -1, -1, -1).clone(), g)
        for i in range(100):
            lost = removed_components(onehot, out[i])
            assert sorted((c, len(v)) for c, v in lost) == sorted(drawn['removed'][i])
            ours.append(lost)
    for side in (theirs, ours):
        assert all(len({c for c, _ in lost}) == len(lost) for lost in side)   # at most one per channel
        assert set().union(*side) == removable
        p_changed = np.mean([bool(lost) for lost in side])
        assert abs(p_changed - 0.15) < binomial_tolerance(0.15, sides=1), p_changed
    for component in removable:                  # P(removed) = 0.2 · 0.5 / (removable ones in its channel)
        p_theirs = np.mean([component in lost for lost in theirs])
        p_ours = np.mean([component in lost for lost in ours])
        channel, voxels = component
        assert abs(p_ours - p_theirs) < binomial_tolerance(p_theirs), (channel, len(voxels), p_ours, p_theirs)


# ------------------------------------------------------------------------------------------------------------
# a tiny cascade dataset (plans with 3d_lowres and 3d_cascade_fullres), preprocessed for both stages
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def cascade_set(tmp_path_factory):
    "{'raw', 'pre', 'plans', 'dataset_json', 'previous'}: previous holds a fake first-stage map per case."
    from nnunet_lite.data import make_synthetic_dataset
    from nnunet_lite.plans import plan_dataset
    from nnunet_lite.preprocessing import load_preprocessed_case, preprocess_dataset
    root = tmp_path_factory.mktemp('cascade')
    raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=2, n_test=1, n_classes=2, shape=(32, 48, 48),
                                 progress=False)
    pre = root / 'pre'
    plans = plan_dataset(raw, pre, gpu_memory_gb=0.03, progress=False)
    assert plans['configurations']['3d_cascade_fullres'] == {'inherits_from': '3d_fullres',
                                                             'previous_stage': '3d_lowres'}
    for configuration in ('3d_lowres', '3d_fullres'):
        preprocess_dataset(raw, plans, configuration, pre, progress=False)
    previous = root / 'predicted_next_stage'
    previous.mkdir()
    for case in ('case_000', 'case_001'):     # the label shifted by 3 voxels: unlike the label, like a map
        _, seg, _ = load_preprocessed_case(pre / '3d_fullres', case)
        np.save(previous / f'{case}.npy', np.roll(np.maximum(seg[0], 0), 3, axis=2).astype(np.uint8))
    return {'raw': raw, 'pre': pre, 'plans': plans, 'previous': previous,
            'dataset_json': json.loads((pre / 'dataset.json').read_text())}


# ------------------------------------------------------------------------------------------------------------
# the first stage's hand-over: logits on the lowres grid -> label map on the fullres grid
# ------------------------------------------------------------------------------------------------------------

def test_next_stage_segmentation_equals_reference_resample_and_save(cascade_set, tmp_path):
    """Our next_stage_segmentation against the reference's own resample_and_save (as perform_actual_validation
    calls it: float16 logits, the lowres configuration, target shape = the fullres case's preprocessed shape).
    The reference interpolates float16 logits and takes the argmax in float16; we do it in float32, so voxels
    whose two best logits are within float16 rounding may differ: at most 0.2 % (here: smooth logits of a
    label map)."""
    from nnunet_lite.plans import Configuration
    from nnunet_lite.preprocessing import label_to_logits, load_preprocessed_case, next_stage_segmentation
    from nnunetv2.inference.export_prediction import resample_and_save
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre, plans, dataset_json = cascade_set['pre'], cascade_set['plans'], cascade_set['dataset_json']
    pm = PlansManager(json.loads(json.dumps(plans)))
    for case in ('case_000', 'case_001'):
        _, low_seg, low_props = load_preprocessed_case(pre / '3d_lowres', case)
        full_shape = load_preprocessed_case(pre / '3d_fullres', case)[0].shape[1:]
        g = torch.Generator().manual_seed(int(case[-1]))
        logits = torch.from_numpy(label_to_logits(np.asarray(low_seg), 3, scale=4.0))
        logits = (logits + torch.randn(logits.shape, generator=g)).to(torch.float16)
        ours = next_stage_segmentation(logits, low_props, Configuration.from_plans(plans, '3d_lowres'),
                                       Configuration.from_plans(plans, '3d_cascade_fullres', dataset_json))
        props = {'spacing': low_props['spacing_before_resampling'],
                 'shape_after_cropping_and_before_resampling':
                     low_props['shape_after_cropping_and_before_resampling']}
        with quiet():
            resample_and_save(logits, list(full_shape), str(tmp_path / case), pm,
                              pm.get_configuration('3d_lowres'), props, cascade_set['dataset_json'], 1,
                              nnUNetDatasetNumpy)
        theirs = np.load(tmp_path / f'{case}.npz')['seg']
        assert ours.shape == theirs.shape == tuple(full_shape) and ours.dtype == theirs.dtype == np.uint8
        differ = (ours != theirs).sum()
        assert (ours == theirs).mean() >= 0.998, f"{case}: {differ} of {ours.size} voxels differ"
        assert set(np.unique(theirs)) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------------------
# 5: the previous stage's channels in validation batches, against the reference's loader and transforms
# ------------------------------------------------------------------------------------------------------------

class _FakeReferenceDataset:
    "What nnUNetDataLoader reads: load_case -> (data, seg, seg_prev, properties), of our preprocessed files."
    def __init__(self, folder, previous, cases):
        from nnunet_lite.preprocessing import load_preprocessed_case
        self.identifiers, self.folder, self.previous = list(cases), folder, previous
        self._load = load_preprocessed_case

    def load_case(self, case):
        data, seg, props = self._load(self.folder, case)
        return data, seg, np.load(self.previous / f'{case}.npy', mmap_mode='r'), props


@pytest.mark.parametrize("patch", ['planned', [40, 52, 52]], ids=['planned_patch', 'patch_larger_than_image'])
def test_validation_batches_equal_reference_loader(cascade_set, monkeypatch, patch):
    """TrainingBatches(augment=False) of a cascade dataset: for every sample, the reference's nnUNetDataLoader
    (its generate_train_batch, told the same case and box) with nnUNetTrainer.get_validation_transforms(
    ds scales, is_cascaded=True, foreground_labels) gives the same data (image + one-hot previous stage) and
    the same deep supervision targets. Our boxes are read off by wrapping crop_and_pad. The second patch is
    larger than every image: the previous stage is padded with -1 there, i.e. all-zero one-hot channels."""
    from nnunet_lite.dataloading import PreprocessedDataset, TrainingBatches, pipeline_settings
    from nnunet_lite.plans import Configuration
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre, plans, dataset_json = cascade_set['pre'], cascade_set['plans'], cascade_set['dataset_json']
    settings = pipeline_settings(Configuration.from_plans(plans, '3d_cascade_fullres', dataset_json),
                                 dataset_json)
    assert settings['cascade_labels'] == [1, 2]
    if patch != 'planned':
        settings = {**settings, 'patch_size': list(patch)}
    patch = settings['patch_size']
    cases = ['case_000', 'case_001']
    starts = []
    crop = dataloading.crop_and_pad
    def recording_crop(array, start, *args, **kwargs):
        starts.append(list(start))
        return crop(array, start, *args, **kwargs)
    monkeypatch.setattr(dataloading, 'crop_and_pad', recording_crop)
    dataset = PreprocessedDataset(pre / '3d_fullres', cases, previous_predictions=cascade_set['previous'])
    batches = TrainingBatches(dataset, settings, augment=False, batch_size=3, threads=1, prefetch=1, seed=3)

    pm = PlansManager(json.loads(json.dumps(plans)))
    label_manager = pm.get_label_manager(dataset_json)
    transforms = nnUNetTrainer.get_validation_transforms(settings['ds_scales'], is_cascaded=True,
                                                         foreground_labels=label_manager.foreground_labels)
    with quiet():
        loader = nnUNetDataLoader(_FakeReferenceDataset(pre / '3d_fullres', cascade_set['previous'], cases),
                                  1, patch, patch, label_manager, oversample_foreground_percent=0,
                                  transforms=transforms)
    onehot_seen = outside_seen = 0
    try:
        for _ in range(4):
            before = len(starts)
            batch = next(batches)
            assert len(starts) - before == 3 * len(batch['keys'])            # image, label, previous stage
            assert batch['data'].shape == (3, 1 + 2, *patch)
            for j, key in enumerate(batch['keys']):
                box = starts[before + 3 * j]
                assert starts[before + 3 * j + 1] == starts[before + 3 * j + 2] == box
                loader.get_indices = lambda: [key]
                loader.get_bbox = lambda *a, box=box: (box, [b + p for b, p in zip(box, patch)])
                with quiet():                              # it warns that our memmaps are read-only
                    ref = loader.generate_train_batch()
                assert torch.equal(batch['data'][j], ref['data'][0]), f"{key} at {box}: data differs"
                assert len(batch['target']) == len(ref['target'])
                for ours, theirs in zip(batch['target'], ref['target']):
                    assert torch.equal(ours[j].to(theirs.dtype), theirs[0]), f"{key} at {box}: target differs"
                onehot_seen += int(batch['data'][j, 1:].sum())
                shape = dataset[key][0].shape[1:]
                outside = torch.ones(patch, dtype=torch.bool)
                outside[tuple(slice(max(0, -b), min(p, s - b)) for b, p, s in zip(box, patch, shape))] = False
                outside_seen += int(outside.sum())
                assert batch['data'][j, 1:, outside].abs().sum() == 0         # padding: no previous stage
    finally:
        batches.close()
    assert onehot_seen > 0
    if patch == [40, 52, 52]:
        assert outside_seen > 0


# ------------------------------------------------------------------------------------------------------------
# 6: our 3d_cascade_fullres checkpoint in the reference's predictor
# ------------------------------------------------------------------------------------------------------------

def test_cascade_checkpoint_predicts_the_same_in_reference_predictor(cascade_set, tmp_path):
    """A 3d_cascade_fullres model of ours (1 epoch of 2 iterations, fold 'all', trained on the fake
    first-stage maps) loads in nnUNetPredictor.initialize_from_trained_model_folder. Given the same
    first-stage prediction (in the test image's own geometry: spacing (1.4, 0.9, 1.1), zero slabs so that it
    is cropped and its background outside the body becomes -1), the reference's preprocessing gives the same
    network input as our Predictor (image close, one-hot channels identical up to resampling ties: >= 99.9 %
    of voxels) and its predict_from_files_sequential the same segmentation as ours, mirroring off on both
    sides: >= 99.9 % of voxels (observed: 99.97 %); the reference accumulates the tiles' logits in float16, we
    in float32: with float16 sums (sliding_window_predict(accumulate_dtype=float16)) >= 99.99 % (observed: all
    but 0-2 voxels)."""
    from nnunet_lite.data import Geometry, read_image, read_label, write_image, write_label
    from nnunet_lite.inference import Predictor, sliding_window_predict
    from nnunet_lite.training import Trainer
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    raw, pre = cascade_set['raw'], cascade_set['pre']
    trainer = Trainer(pre, '3d_cascade_fullres', 'all', epochs=1, iterations=2, val_iterations=0,
                      device='cpu', amp=False, progress=False, threads=1,
                      previous_predictions=cascade_set['previous'])
    trainer.fit()
    model = pre / 'results' / '3d_cascade_fullres'

    image, geometry = read_image([raw / 'imagesTs' / 'test_000_0000.nii.gz'])
    label, _ = read_label(raw / 'labelsTs' / 'test_000.nii.gz')
    image = image.copy()
    image[:, :3] = 0                        # cropped away
    image[:, :, :8, :8] = 0                 # inside the box, outside the body: the first stage's 0 becomes -1
    geometry = Geometry((1.4, 0.9, 1.1), geometry.origin, geometry.direction)
    images, firsts = tmp_path / 'images', tmp_path / 'first_stage'
    files = write_image(image, geometry, images, 'shifted_000')
    first = np.roll(label, -2, axis=1)
    first[:, :4, :4] = 1                    # label 1 where the body mask is off
    write_label(first, geometry, firsts / 'shifted_000.nii.gz')

    ours = Predictor(model, device='cpu', mirroring=False, amp=False, progress=False,
                     previous_predictions=firsts)
    data, properties, _ = ours.read_and_preprocess(files)
    our_seg = ours.export(ours.predict_preprocessed(data), properties)
    with torch.inference_mode():
        half_sums = sliding_window_predict(ours.networks[0], torch.as_tensor(np.asarray(data)),
                                           ours.config.patch_size, 0.5, (), accumulate_dtype=torch.float16)
    our_seg_half_sums = ours.export(half_sums, properties)

    with quiet():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device('cpu'),
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), use_folds=('all',))
        assert predictor.configuration_manager.previous_stage_name == '3d_lowres'
        assert predictor.allowed_mirroring_axes == (0, 1, 2)
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        ref_data, ref_seg, _ = preprocessor.run_case([str(f) for f in files],
                                                     str(firsts / 'shifted_000.nii.gz'),
                                                     predictor.plans_manager, predictor.configuration_manager,
                                                     predictor.dataset_json)
        theirs = predictor.predict_from_files_sequential([[str(f) for f in files]], None,
                                                         folder_with_segs_from_prev_stage=str(firsts))[0]
    ref_input = np.vstack((ref_data,
                           convert_labelmap_to_one_hot(ref_seg[0], predictor.label_manager.foreground_labels,
                                                                 ref_data.dtype)))
    data = np.asarray(data)
    assert data.shape == ref_input.shape and data.shape[0] == 3
    assert (ref_seg == -1).any() and data.shape[1:] != image.shape[1:]        # cropped, -1 outside, resampled
    np.testing.assert_allclose(data[0], ref_input[0], rtol=1e-4, atol=1e-4)
    onehot_equal = (data[1:] == ref_input[1:]).all(0).mean()
    assert onehot_equal >= 0.999, f"one-hot channels differ at {(1 - onehot_equal):.3%} of the voxels"
    assert ref_input[1:].sum() > 0
    assert our_seg.shape == theirs.shape == image.shape[1:]
    equal = (our_seg == theirs).mean()
    assert equal >= 0.999, f"{(our_seg != theirs).sum()} of {our_seg.size} voxels differ"
    equal = (our_seg_half_sums == theirs).mean()
    differ = (our_seg_half_sums != theirs).sum()
    assert equal >= 0.9999, f"float16 sums: {differ} of {our_seg.size} voxels differ"
    assert len(np.unique(theirs)) > 1
