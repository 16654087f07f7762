"""tools/notebook_outputs.py: the notebooks carry their outputs, and a stale output cannot pass unnoticed."""
import base64
import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('notebook_outputs', ROOT / 'tools' / 'notebook_outputs.py')
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def notebook(name='03_plans.ipynb'):
    return json.loads((ROOT / 'nbs' / name).read_text(encoding='utf-8'))


def test_the_repository_notebooks_carry_current_outputs():
    "What CI checks: every notebook ran with its present cells and modules, and kept what it showed."
    run = subprocess.run([sys.executable, 'tools/notebook_outputs.py', '--check'], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for path in sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb')):
        nb = json.loads(path.read_text(encoding='utf-8'))
        images = sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))
        shown = sum(bool(c.get('outputs')) for c in nb['cells'] if c['cell_type'] == 'code')
        assert shown, f"{path.name} stores no output at all"
        if path.stem not in ('15_course', '16_cli'): assert images, f"{path.name} stores no figure"


def test_an_edited_cell_is_stale():
    nb = notebook()
    assert tool.stale(nb) == []
    i = next(i for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code')
    edited = copy.deepcopy(nb)
    edited['cells'][i]['source'] = tool.cell_text(edited['cells'][i]) + '\nx = 1'
    assert tool.stale(edited) == [f'cell {i} changed after it ran']
    added = copy.deepcopy(nb)
    added['cells'].insert(i + 1, dict(cell_type='code', metadata={}, source='1 + 1', outputs=[]))
    assert f'cell {i + 1} has never run' in tool.stale(added)


def test_a_changed_module_makes_the_notebooks_that_import_it_stale():
    nb = notebook()
    assert 'nnunet_lite.plans' in nb['metadata']['outputs_of']
    assert 'nnunet_lite.fingerprint' in nb['metadata']['outputs_of']   # imported by plans.py, relatively
    changed = copy.deepcopy(nb)
    changed['metadata']['outputs_of']['nnunet_lite.fingerprint'] = '0' * 16
    assert tool.stale(changed) == ['nnunet_lite.fingerprint changed after it ran']
    del changed['metadata']['outputs_of']
    assert tool.stale(changed) == ['no record of the modules its outputs came from']


def test_the_check_names_each_stale_notebook(tmp_path, monkeypatch, capsys):
    nb = notebook()
    nb['cells'][-1]['source'] = tool.cell_text(nb['cells'][-1]) + ' '
    if nb['cells'][-1]['cell_type'] != 'code':
        nb['cells'].append(dict(cell_type='code', metadata={}, source='pass', outputs=[]))
    copy_path = tmp_path / '03_plans.ipynb'
    copy_path.write_text(json.dumps(nb), encoding='utf-8')
    monkeypatch.setattr(tool, 'ROOT', tmp_path)
    assert tool.check([copy_path]) == 1
    out = capsys.readouterr().out
    assert '03_plans.ipynb: stored outputs are stale' in out and 'rerun' in out


def test_imported_modules_follow_absolute_and_relative_imports():
    code = ("from nnunet_lite.plans import plan\nimport nnunet_lite.data as d\nfrom nnunet_lite import viz\n"
            "%matplotlib inline")
    assert tool.imported_modules(code) == {'nnunet_lite.plans', 'nnunet_lite.data', 'nnunet_lite.viz'}
    closure = tool.module_closure({'nnunet_lite.cli'})
    assert {'nnunet_lite.training', 'nnunet_lite.inference', 'nnunet_lite.data'} <= set(closure)


def png_of(array):
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).save(out, format='PNG')
    return base64.b64encode(out.getvalue()).decode()


def test_outputs_are_tidied_for_storing():
    rng = np.random.default_rng(0)
    figure = np.repeat(np.linspace(0, 255, 200, dtype=np.uint8)[None], 120, 0)
    noisy = (figure // 2 + rng.integers(0, 3, figure.shape)).astype(np.uint8)
    figure = np.stack([figure, figure[::-1], noisy], -1)
    png = png_of(figure)
    outputs = [
        {'output_type': 'display_data', 'metadata': {}, 'data': {   # a progress bar: dropped
            tool.WIDGET_VIEW: {'model_id': 'a'}, 'text/plain': 'HBox(children=(...))'}},
        {'output_type': 'display_data', 'metadata': {}, 'data': {   # the slice viewer: its image kept
            tool.WIDGET_VIEW: {'model_id': 'b'}, 'image/png': png, 'text/plain': 'SliceViewer'}},
        {'output_type': 'stream', 'name': 'stderr', 'text': 'cases: 100%|##########| 3/3\r\n'},
        {'output_type': 'stream', 'name': 'stderr', 'text': 'UserWarning: something to read\n'},
    ]
    kept = tool.tidy_outputs(outputs)
    assert len(kept) == 2
    assert tool.WIDGET_VIEW not in kept[0]['data'] and kept[0]['data']['text/plain'] == 'SliceViewer'
    assert len(kept[0]['data']['image/png']) <= len(png)
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(kept[0]['data']['image/png'])))
    assert image.size == (200, 120)
    # a palette of the same picture
    assert np.abs(np.asarray(image.convert('RGB'), float) - figure).mean() < 4
    assert kept[1]['text'].startswith('UserWarning')


@pytest.mark.parametrize('name, expected', [('03_plans', '03_plans.ipynb'), ('03', '03_plans.ipynb'),
                                            ('nbs/16_cli.ipynb', '16_cli.ipynb')])
def test_notebook_names(name, expected):
    assert [p.name for p in tool.resolve([name])] == [expected]
