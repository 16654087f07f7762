"""Medical Segmentation Decathlon conversion: ours against the reference's nnUNetv2_convert_MSD_dataset, file
by file, and the one-line refusals (nothing left behind)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnunet_lite.data as data
from nnunet_lite.data import DatasetError, check_dataset, convert_msd_dataset

ROTATION = np.array([[0.94, -0.34, 0.0], [0.34, 0.94, 0.0], [0.0, 0.0, 1.0]])
ROTATION /= np.linalg.norm(ROTATION, axis=1, keepdims=True)


def msd_image(channels: np.ndarray, spacing=(0.9, 0.8, 2.5), origin=(-12.0, 30.5, 7.0)) -> sitk.Image:
    "An MSD image from (c, z, y, x): 4D (channels on the 4th axis) when c > 1, else 3D; rotated, shifted."
    if len(channels) == 1:
        img = sitk.GetImageFromArray(channels[0])
        img.SetSpacing(spacing); img.SetOrigin(origin); img.SetDirection(tuple(ROTATION.ravel()))
        return img
    img = sitk.GetImageFromArray(channels, isVector=False)
    direction = np.eye(4); direction[:3, :3] = ROTATION
    img.SetSpacing(spacing + (1.0,)); img.SetOrigin(origin + (0.0,))
    img.SetDirection(tuple(direction.ravel()))
    return img


def write_task(root, name, modality, dtype, n_train=3, n_test=1, shape=(5, 6, 7), junk=True):
    "A small MSD task folder `root/name` with random images, labels 0..2, an MSD dataset.json."
    rng = np.random.default_rng(len(name))
    task = root / name
    for sub in ('imagesTr', 'labelsTr', 'imagesTs'): (task / sub).mkdir(parents=True)
    prefix = name.split('_')[1].lower()[:5]
    training, test = [], []
    for i in range(n_train + n_test):
        case = f'{prefix}_{i:03d}.nii.gz'
        image = (rng.normal(size=(len(modality),) + shape) * 100).astype(dtype)
        folder = 'imagesTr' if i < n_train else 'imagesTs'
        sitk.WriteImage(msd_image(image), str(task / folder / case))
        if i < n_train:
            label = sitk.GetImageFromArray(rng.integers(0, 3, shape).astype(np.uint8))
            label.CopyInformation(msd_image(image[:1]))
            sitk.WriteImage(label, str(task / 'labelsTr' / case))
            training.append({'image': f'./imagesTr/{case}', 'label': f'./labelsTr/{case}'})
        else:
            test.append(f'./imagesTs/{case}')
    if junk:   # what unpacking an MSD archive made on a Mac leaves beside every file
        first = sorted((task / 'imagesTr').iterdir())[0].name
        (task / 'imagesTr' / f'._{first}').write_bytes(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X')
        (task / 'labelsTr' / f'._{first}').write_bytes(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X')
    msd = {'name': name.split('_')[1], 'description': 'synthetic', 'reference': 'none',
           'licence': 'CC-BY-SA 4.0', 'release': '1.0 04/05/2018',
           'tensorImageSize': '4D' if len(modality) > 1 else '3D',
           'modality': {str(i): m for i, m in enumerate(modality)},
           'labels': {'0': 'background', '1': 'organ', '2': 'tumour'},
           'numTraining': n_train, 'numTest': n_test, 'training': training, 'test': test}
    (task / 'dataset.json').write_text(json.dumps(msd, indent=4))
    return task


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp('msd')
    return {'4d': write_task(root, 'Task01_BrainTumour', ['FLAIR', 'T1w'], np.float32),
            '3d': write_task(root, 'Task03_Liver', ['CT'], np.int16, junk=False)}


def reference_conversion(task, out, monkeypatch) -> Path:
    from reference_oracle import require_reference
    require_reference()
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (out / var).mkdir(parents=True)
        monkeypatch.setenv(var, str(out / var))
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset as reference
    reference(str(task), num_processes=1)
    (converted,) = (out / 'nnUNet_raw').iterdir()
    return converted


def tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.mark.parametrize('kind', ['4d', '3d'])
def test_conversion_equals_reference_file_by_file(tasks, kind, tmp_path, monkeypatch):
    ours = convert_msd_dataset(tasks[kind], tmp_path / 'ours', progress=False)
    theirs = reference_conversion(tasks[kind], tmp_path / 'theirs', monkeypatch)
    assert ours.name == theirs.name == {'4d': 'Dataset001_BrainTumour', '3d': 'Dataset003_Liver'}[kind]
    assert tree(ours) == tree(theirs)
    assert not any('._' in name for name in tree(ours))
    ours_json = json.loads((ours / 'dataset.json').read_text())
    theirs_json = json.loads((theirs / 'dataset.json').read_text())
    assert ours_json == theirs_json and list(ours_json) == list(theirs_json)
    images = [f for f in tree(ours) if f.startswith('images') and f.endswith('.nii.gz')]
    assert len(images) == (8 if kind == '4d' else 4)
    for f in images:
        a, b = sitk.ReadImage(str(ours / f)), sitk.ReadImage(str(theirs / f))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), err_msg=f)
        assert sitk.GetArrayFromImage(a).dtype == sitk.GetArrayFromImage(b).dtype, f
        for what in ('GetSpacing', 'GetOrigin', 'GetDirection'):
            np.testing.assert_allclose(getattr(a, what)(), getattr(b, what)(), atol=1e-6,
                                       err_msg=f"{f} {what}")
    for f in (f for f in tree(ours) if f.startswith('labelsTr/')):
        assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
    assert check_dataset(ours, progress=False) == []


def test_channels_keep_the_voxels_and_grid_of_the_4d_file(tasks, tmp_path):
    ours = convert_msd_dataset(tasks['4d'], tmp_path, dataset_id=201, workers=3, progress=False)
    assert ours.name == 'Dataset201_BrainTumour'
    four = sitk.ReadImage(str(tasks['4d'] / 'imagesTr' / 'brain_001.nii.gz'))
    for c in range(2):
        image, geometry = data.read_file(ours / 'imagesTr' / f'brain_001_{c:04d}.nii.gz')
        np.testing.assert_array_equal(image[0], sitk.GetArrayFromImage(four)[c])
        np.testing.assert_allclose(geometry.spacing, (2.5, 0.8, 0.9), rtol=1e-6)
        np.testing.assert_allclose(geometry.origin, (-12.0, 30.5, 7.0), rtol=1e-6)
        np.testing.assert_allclose(np.reshape(geometry.direction, (3, 3)), ROTATION, atol=1e-6)


def broken(tasks, tmp_path, kind='4d'):
    task = tmp_path / tasks[kind].name
    shutil.copytree(tasks[kind], task)
    return task


def refused(task, out, contains, **kwargs):
    with pytest.raises((DatasetError, ValueError, FileNotFoundError)) as e:
        convert_msd_dataset(task, out, progress=False, **kwargs)
    assert contains in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith('Dataset')], \
        list(out.iterdir())
    return str(e.value)


def test_refusals_name_the_file_and_leave_nothing(tasks, tmp_path):
    out = tmp_path / 'raw'
    task = broken(tasks, tmp_path); (task / 'dataset.json').unlink()
    refused(task, out, 'Task01_BrainTumour/dataset.json: file not found')
    task = broken(tasks, tmp_path / 'a'); shutil.rmtree(task / 'imagesTr')
    refused(task, out, 'Task01_BrainTumour/imagesTr: not found')
    task = broken(tasks, tmp_path / 'b'); (task / 'labelsTr' / 'brain_002.nii.gz').unlink()
    refused(task, out, 'labelsTr/brain_002.nii.gz: missing, the label of')
    task = broken(tasks, tmp_path / 'c')
    shutil.copy(task / 'labelsTr' / 'brain_000.nii.gz', task / 'labelsTr' / 'x.nii.gz')
    refused(task, out, 'labelsTr/x.nii.gz: label without image')
    task = broken(tasks, tmp_path / 'd')          # a 3D image in a two-modality task
    shutil.copy(tasks['3d'] / 'imagesTr' / 'liver_000.nii.gz', task / 'imagesTr' / 'brain_001.nii.gz')
    refused(task, out, 'imagesTr/brain_001.nii.gz: 1 channel(s), but dataset.json modality lists 2')
    task = broken(tasks, tmp_path / 'e')          # three channels in a two-modality task
    three = msd_image(np.zeros((3, 5, 6, 7), np.float32))
    sitk.WriteImage(three, str(task / 'imagesTs' / 'brain_003.nii.gz'))
    refused(task, out, 'imagesTs/brain_003.nii.gz: 3 channel(s), but dataset.json modality lists 2')
    task = broken(tasks, tmp_path / 'f')
    msd = json.loads((task / 'dataset.json').read_text()); del msd['modality']
    (task / 'dataset.json').write_text(json.dumps(msd))
    refused(task, out, "dataset.json: no MSD 'modality' mapping")
    task = broken(tasks, tmp_path / 'g'); renamed = task.with_name('BrainTumour'); task.rename(renamed)
    refused(renamed, out, 'named TaskNN_Name')
    assert not out.exists()


def test_a_taken_id_is_refused_and_an_empty_target_is_filled(tasks, tmp_path):
    out = tmp_path / 'raw'
    (out / 'Dataset003_Other').mkdir(parents=True)
    said = refused(tasks['3d'], out, 'Dataset003_Other: dataset id 003 is taken')
    assert 'choose another id' in said
    assert convert_msd_dataset(tasks['3d'], out, dataset_id=4, progress=False).name == 'Dataset004_Liver'
    refused(tasks['3d'], out, 'Dataset004_Liver: dataset id 004 is taken', dataset_id=4)   # twice
    (out / 'Dataset005_Liver').mkdir()
    assert convert_msd_dataset(tasks['3d'], out, dataset_id=5, progress=False) == out / 'Dataset005_Liver'
    assert check_dataset(out / 'Dataset005_Liver', progress=False) == []
    with pytest.raises(ValueError, match='from 0 to 999'):
        convert_msd_dataset(tasks['3d'], out, dataset_id=1000, progress=False)


def test_a_failure_while_writing_leaves_no_half_dataset(tasks, tmp_path, monkeypatch):
    real = data.split_msd_image

    def fail_on_second(path, out_folder):
        if path.name == 'brain_001.nii.gz': raise OSError(28, 'No space left on device')
        return real(path, out_folder)

    monkeypatch.setattr(data, 'split_msd_image', fail_on_second)
    with pytest.raises(OSError, match='No space left'):
        convert_msd_dataset(tasks['4d'], tmp_path / 'raw', workers=2, progress=False)
    assert list((tmp_path / 'raw').iterdir()) == []


def test_a_zero_header_spacing_is_refused_before_writing(tasks, tmp_path):
    import gzip
    import struct
    task = broken(tasks, tmp_path, '3d')
    f = task / 'labelsTr' / 'liver_001.nii.gz'
    raw = bytearray(gzip.decompress(f.read_bytes())); struct.pack_into('<f', raw, 76 + 4 * 1, 0.0)
    f.write_bytes(gzip.compress(bytes(raw)))
    refused(task, tmp_path / 'raw', 'liver_001.nii.gz: header spacing of the x axis (pixdim[1]) is 0')


def test_the_convert_msd_command_writes_beside_the_task(tasks, tmp_path):
    "nnlite convert-msd TASK: DatasetNNN_Name beside the task folder (or in OUT), ready for nnlite check."
    from cli_runner import nnlite
    task = Path(shutil.copytree(tasks['4d'], tmp_path / tasks['4d'].name))
    r = nnlite('convert-msd', task, '-q')
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'Dataset001_BrainTumour'}: 3 training cases, channels FLAIR, T1w" in r.stdout
    assert nnlite('check', tmp_path / 'Dataset001_BrainTumour', '-q').returncode == 0
    r = nnlite('convert-msd', task, '-q')                            # the id is taken now
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'is taken' in r.stderr
    r = nnlite('convert-msd', task, tmp_path / 'elsewhere', '--id', 501, '-q')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'elsewhere' / 'Dataset501_BrainTumour' / 'dataset.json').is_file()
