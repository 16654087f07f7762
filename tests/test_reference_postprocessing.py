"""Post-processing against nnU-Net v2: the largest-component operation, the steps determine_postprocessing
chooses, and the `nnlite postprocess` commands."""
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_lite.data import Geometry, read_label, write_label
from nnunet_lite.postprocessing import determine_postprocessing, keep_largest

from cli_runner import nnlite
from reference_oracle import require_reference  # noqa: E402
require_reference()
from nnunetv2.postprocessing.remove_connected_components import (  # noqa: E402
    determine_postprocessing as reference_determine, remove_all_but_largest_component_from_segmentation)

G = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.mark.parametrize("seed", range(6))
def test_keep_largest_equals_reference(seed):
    rng = np.random.default_rng(seed)
    seg = (rng.random((7, 12, 13)) < 0.25).astype(np.uint8) * rng.integers(1, 4, (7, 12, 13)).astype(np.uint8)
    for which in ([1, 2, 3], 1, 2, (2, 3), [(1, 2), 3]):
        ours = keep_largest(seg, which)
        theirs = remove_all_but_largest_component_from_segmentation(seg, which)
        np.testing.assert_array_equal(ours, theirs, err_msg=str(which))


def crafted(root: Path, stray_organ: bool, split_lesion: bool, seed: int):
    rng = np.random.default_rng(seed)
    for d in ('gt', 'pred'): (root / d).mkdir(parents=True)
    dj = {'labels': {'background': 0, 'organ': 1, 'lesion': 2, 'vessel': 3}, 'file_ending': '.nii.gz',
          'channel_names': {'0': 'CT'}, 'numTraining': 4}
    for d in ('gt', 'pred'): (root / d / 'dataset.json').write_text(json.dumps(dj))
    for i in range(4):
        truth = np.zeros((10, 20, 20), np.uint8)
        truth[2:7, 3:11, 3:11] = 1; truth[3:5, 5:8, 5:8] = 2; truth[:, 15, 15] = 3
        if split_lesion: truth[8, 15:17, 2:4] = 2
        pred = truth.copy()
        pred[rng.integers(0, 10, 3), rng.integers(0, 20, 3), rng.integers(0, 3, 3)] = 1 if stray_organ else 0
        pred[0, 0, rng.integers(0, 20)] = 3      # a stray vessel voxel
        write_label(truth, G, root / 'gt' / f'c{i}.nii.gz')
        write_label(pred, G, root / 'pred' / f'c{i}.nii.gz')
    return dj


@pytest.mark.parametrize("stray_organ,split_lesion,seed",
                         [(True, False, 0), (True, True, 1), (False, True, 2), (False, False, 3)])
def test_chosen_steps_equal_reference(tmp_path, stray_organ, split_lesion, seed):
    dj = crafted(tmp_path / 'ours', stray_organ, split_lesion, seed)
    crafted(tmp_path / 'theirs', stray_organ, split_lesion, seed)
    rules = determine_postprocessing(tmp_path / 'ours' / 'pred', tmp_path / 'ours' / 'gt', progress=False)
    plans = {'dataset_name': 'x', 'plans_name': 'p', 'image_reader_writer': 'SimpleITKIO',
             'configurations': {}, 'original_median_spacing_after_transp': [1, 1, 1],
             'original_median_shape_after_transp': [1, 1, 1], 'transpose_forward': [0, 1, 2],
             'transpose_backward': [0, 1, 2], 'experiment_planner_used': 'x', 'label_manager': 'LabelManager',
             'foreground_intensity_properties_per_channel': {}}
    fns, kwargs = reference_determine(str(tmp_path / 'theirs' / 'pred'), str(tmp_path / 'theirs' / 'gt'),
                                      plans, dj, num_processes=1)
    theirs = [k['labels_or_regions'] for k in kwargs]
    ours = [s if len(s) > 1 else s[0] for s in rules['steps']]
    assert ours == [t if not isinstance(t, tuple) else list(t) for t in theirs], (ours, theirs)
    for f in sorted((tmp_path / 'ours' / 'pred' / 'postprocessed').glob('*.nii.gz')):
        np.testing.assert_array_equal(read_label(f)[0],
                                      read_label(tmp_path / 'theirs' / 'pred' / 'postprocessed' / f.name)[0])


def test_cli_postprocess(tmp_path):
    crafted(tmp_path, True, False, 0)
    run = lambda *a: nnlite('postprocess', *a)
    r = run('determine', tmp_path / 'pred', tmp_path / 'gt', '-q')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'pred' / 'postprocessing.json').exists() and 'foreground mean Dice' in r.stdout
    r = run('apply', '-i', tmp_path / 'pred', '-o', tmp_path / 'new', '-r',
            tmp_path / 'pred' / 'postprocessing.json', '-q')
    assert r.returncode == 0, r.stderr
    for f in sorted((tmp_path / 'new').glob('*.nii.gz')):
        np.testing.assert_array_equal(read_label(f)[0],
                                      read_label(tmp_path / 'pred' / 'postprocessed' / f.name)[0])
    r = run('apply', '-i', tmp_path / 'pred', '-o', tmp_path / 'x', '-r', tmp_path / 'missing.json', '-q')
    assert r.returncode == 1 and 'missing.json: no such post-processing file' in r.stderr
