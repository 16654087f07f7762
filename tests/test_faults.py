"""The catalogue of broken inputs (issue 17), each run through every command that reads it, in a subprocess as
a user runs nnlite: the exit status is 1, the message is one line naming the broken file, and nothing is
written under a real name for the broken case. Also: a resume redoes a case whose raw files changed, and the
worker processes of a killed `nnlite preprocess` die with it."""
import contextlib
import io
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_lite.cli import main
from nnunet_lite.data import make_synthetic_dataset, read_file, read_label, write_file, write_label

from cli_runner import nnlite, start

CASE = 'case_001'


def nnlite_here(*args):
    "The same command in this process (`main` is what the console script calls): no interpreter to start."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def cut(path: Path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])


def with_nan(path: Path):
    image, geometry = read_file(path)
    image = image.astype(np.float32)
    image[0, 2, 3:6, 3:6] = np.nan
    write_file(image, geometry, path)


def with_label(path: Path, value: int):
    label, geometry = read_label(path)
    label[0, 0, :3] = value
    write_label(label, geometry, path)


# the broken case's files, relative to the dataset folder
IMAGE, SECOND_CHANNEL = f'imagesTr/{CASE}_0000.nii.gz', f'imagesTr/{CASE}_0001.nii.gz'
LABEL = f'labelsTr/{CASE}.nii.gz'

# fault -> (what it does to a dataset folder, the file the message must name)
FAULTS = {
    'image cut to 50 %': (lambda ds: cut(ds / IMAGE, 0.5), IMAGE),
    'image cut to 90 %': (lambda ds: cut(ds / IMAGE, 0.9), IMAGE),
    'image cut to 200 bytes': (lambda ds: cut(ds / IMAGE, 200), IMAGE),
    'label cut to 50 %': (lambda ds: cut(ds / LABEL, 0.5), LABEL),
    'NaN voxels': (lambda ds: with_nan(ds / IMAGE), IMAGE),
    'undeclared label value': (lambda ds: with_label(ds / LABEL, 7), LABEL),
    'missing image': (lambda ds: [p.unlink() for p in ds.glob(f'imagesTr/{CASE}_000*')], LABEL),
    'missing label': (lambda ds: (ds / LABEL).unlink(), LABEL),
    'missing channel file': (lambda ds: (ds / SECOND_CHANNEL).unlink(), SECOND_CHANNEL),
}


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    "A two-channel MR dataset, its plans and 3d_fullres cases, and a model trained briefly on them."
    root = tmp_path_factory.mktemp('faults')
    raw = make_synthetic_dataset(root / 'raw', 'mr', n_train=5, n_test=2, n_channels=2, n_classes=2,
                                 shape=(10, 20, 20), progress=False)
    assert nnlite('plan', raw, '-o', root / 'plans', '-q').returncode == 0
    assert nnlite('preprocess', raw, root / 'plans', '-c', '3d_fullres', '-np', 1, '-q').returncode == 0
    r = nnlite('train', root / 'plans', '-c', '3d_fullres', '-f', 'all', '--epochs', 1, '--iters', 1,
               '--val-iters', 0, '--no-validation', '--device', 'cpu', '-q')
    assert r.returncode == 0, r.stderr
    return {'raw': raw, 'plans': root / 'plans', 'model': root / 'plans' / 'results' / '3d_fullres'}


def broken_copy(clean, tmp_path, fault):
    ds = tmp_path / 'raw'
    shutil.copytree(clean['raw'], ds)
    FAULTS[fault][0](ds)
    return ds, ds / FAULTS[fault][1]


def one_line_naming(r, path: Path):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize('fault', FAULTS)
def test_check_names_the_file(clean, tmp_path, fault):
    ds, named = broken_copy(clean, tmp_path, fault)
    r = nnlite_here('check', ds, '-q')
    assert r.returncode == 1, r.stdout
    assert any(line.startswith(str(named)) for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize('fault', FAULTS)
def test_plan_refuses(clean, tmp_path, fault):
    ds, named = broken_copy(clean, tmp_path, fault)
    r = nnlite_here('plan', ds, '-o', tmp_path / 'plans', '-q')
    assert r.returncode == 1 and str(named) in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / 'plans' / 'plans.json').exists()


@pytest.mark.parametrize('fault', FAULTS)
def test_preprocess_without_check_refuses(clean, tmp_path, fault):
    "As scripts run it: straight to preprocessing with the clean plans; the broken case is not written."
    ds, named = broken_copy(clean, tmp_path, fault)
    out = tmp_path / 'pre'
    r = nnlite_here('preprocess', ds, clean['plans'] / 'plans.json', '-c', '3d_fullres', '-o', out, '-q')
    one_line_naming(r, named)
    assert not (out / '3d_fullres' / f'{CASE}.json').exists()


IMAGE_FAULTS = ['image cut to 50 %', 'image cut to 200 bytes', 'NaN voxels']


@pytest.mark.parametrize('fault', IMAGE_FAULTS)
def test_predict_refuses(clean, tmp_path, fault):
    ds = tmp_path / 'raw'
    shutil.copytree(clean['raw'], ds)
    image = ds / 'imagesTs' / 'test_001_0000.nii.gz'
    {'image cut to 50 %': lambda: cut(image, 0.5), 'image cut to 200 bytes': lambda: cut(image, 200),
     'NaN voxels': lambda: with_nan(image)}[fault]()
    out = tmp_path / 'predictions'
    r = nnlite('predict', '-i', ds / 'imagesTs', '-o', out, '-m', clean['model'], '--device', 'cpu', '-q')
    one_line_naming(r, image)
    assert not (out / 'test_001.nii.gz').exists()


def test_predict_missing_channel_and_output_file(clean, tmp_path):
    ds = tmp_path / 'raw'
    shutil.copytree(clean['raw'], ds)
    (ds / 'imagesTs' / 'test_001_0001.nii.gz').unlink()
    r = nnlite('predict', '-i', ds / 'imagesTs', '-o', tmp_path / 'p', '-m', clean['model'], '-q')
    one_line_naming(r, ds / 'imagesTs' / 'test_001_0000.nii.gz')
    (tmp_path / 'a_file').write_text('x')
    r = nnlite('predict', '-i', clean['raw'] / 'imagesTs', '-o', tmp_path / 'a_file', '-m', clean['model'],
               '-q')
    one_line_naming(r, tmp_path / 'a_file')
    assert (tmp_path / 'a_file').read_text() == 'x'


def test_evaluate_refuses_a_cut_prediction(clean, tmp_path):
    predictions = tmp_path / 'pred'
    shutil.copytree(clean['raw'] / 'labelsTs', predictions)
    cut(predictions / 'test_001.nii.gz', 0.5)
    r = nnlite('evaluate', predictions, clean['raw'] / 'labelsTs', '-d', clean['raw'] / 'dataset.json', '-q')
    one_line_naming(r, predictions / 'test_001.nii.gz')
    assert not (predictions / 'summary.json').exists()


def test_resume_redoes_a_case_whose_raw_files_changed(clean, tmp_path):
    ds, out = tmp_path / 'raw', tmp_path / 'pre'
    shutil.copytree(clean['raw'], ds)
    args = ('preprocess', ds, clean['plans'] / 'plans.json', '-c', '3d_fullres', '-o', out)
    assert nnlite(*args, '-q').returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / '3d_fullres').glob('case_00[0234]*')}
    with_label(ds / 'labelsTr' / f'{CASE}.nii.gz', 1)                   # the label is corrected
    r = nnlite(*args)
    assert r.returncode == 0, r.stderr
    assert '1 redone, inputs changed (case_001)' in r.stdout and '4 done before' in r.stdout, r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / '3d_fullres').glob('case_00[0234]*')} == before
    for p in ds.glob(f'*/{CASE}*'): p.unlink()                           # the case leaves the dataset
    r = nnlite(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '1 no longer in the dataset removed (case_001)' in r.stdout, r.stdout + r.stderr
    assert not (out / '3d_fullres' / f'{CASE}.json').exists()


def children(pid: int) -> list[int]:
    found = []
    for status in Path('/proc').glob('[0-9]*/status'):
        try: fields = dict(line.split(':\t', 1) for line in status.read_text().splitlines() if ':\t' in line)
        except OSError: continue
        if fields.get('PPid', '').strip() == str(pid): found.append(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    try: return 'Z' not in (Path('/proc') / str(pid) / 'status').read_text().split('State:')[1].split('\n')[0]
    except (OSError, IndexError): return False


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='needs /proc to find the worker processes')
def test_workers_die_with_a_killed_preprocess(tmp_path):
    raw = make_synthetic_dataset(tmp_path / 'raw', 'ct', n_train=6, n_test=0, shape=(48, 96, 96),
                                 progress=False)
    assert nnlite('plan', raw, '-o', tmp_path / 'plans', '-q').returncode == 0
    p = start('preprocess', raw, tmp_path / 'plans', '-c', '3d_fullres', '-np', 2, '-q',
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [c for c in children(p.pid)
                   if b'spawn_main' in (Path('/proc') / str(c) / 'cmdline').read_bytes()]
    assert len(workers) == 2, 'the preprocess workers did not start'
    p.send_signal(signal.SIGKILL); p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(w) for w in workers): time.sleep(0.2)
    assert not any(alive(w) for w in workers), 'orphaned workers are still running'


def test_predict_estimates_memory_before_reading(clean, tmp_path, monkeypatch):
    "A case whose prediction would not fit in the free memory stops before it is read, with the figure."
    import nnunet_lite.inference as inference
    monkeypatch.setattr(inference, 'available_memory', lambda device: {'ram': 1000, 'device': None})
    out = tmp_path / 'predictions'
    r = nnlite_here('predict', '-i', clean['raw'] / 'imagesTs', '-o', out, '-m', clean['model'],
                    '--device', 'cpu', '-q')
    line = one_line_naming(r, clean['raw'] / 'imagesTs' / 'test_000_0000.nii.gz')
    assert 'predicting it needs about' in line and 'GB of RAM' in line, line
    assert not list(out.glob('*.nii.gz'))


@pytest.mark.skipif(not Path('/sys/kernel').is_dir(), reason='needs /sys, a folder no one may write to')
def test_unwritable_or_overlong_outputs_are_one_line_naming_them(clean, tmp_path):
    "A read-only place or a name over 255 bytes: the path the user gave, named, and nothing written."
    args = ('-i', clean['raw'] / 'imagesTs', '-m', clean['model'], '--device', 'cpu', '-q')
    r = nnlite_here('predict', *args, '-o', '/sys/nnlite_predictions')
    assert '.tmp' not in one_line_naming(r, '/sys/nnlite_predictions'), r.stderr
    line = one_line_naming(nnlite_here('predict', *args, '-o', '/sys'), '/sys/plans.json')
    assert 'cannot be written' in line, line
    long = tmp_path / ('p' * 300)
    one_line_naming(nnlite_here('predict', *args, '-o', long), long)
    r = nnlite_here('plan', clean['raw'], '-o', tmp_path / 'plans' / ('q' * 256), '-q')
    one_line_naming(r, tmp_path / 'plans' / ('q' * 256))
    assert not (tmp_path / 'plans').exists() or not any((tmp_path / 'plans').iterdir())


def test_a_plans_file_missing_a_key_names_the_file_and_key(clean, tmp_path):
    model = Path(shutil.copytree(clean['model'], tmp_path / '3d_fullres'))
    plans = json.loads((model / 'plans.json').read_text())
    del plans['configurations']['3d_fullres']['normalization_schemes']
    (model / 'plans.json').write_text(json.dumps(plans))
    r = nnlite_here('predict', '-i', clean['raw'] / 'imagesTs', '-o', tmp_path / 'p', '-m', model, '-q')
    line = one_line_naming(r, model / 'plans.json')
    assert line.endswith("configuration '3d_fullres' has no 'normalization_schemes'"), line
    assert not (tmp_path / 'p').exists()
