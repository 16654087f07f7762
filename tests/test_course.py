"""Course mode end to end: every stage notebook has its header, questionnaire and graded exercises; every
solution passes its tests and every stub fails them (the grader can fail); `nnlite course student` and
`nnlite course grade` on a real notebook, in a fresh kernel; the one-line errors."""
import json, re
from pathlib import Path

import pytest

from cli_runner import nnlite, ok
from nnunet_lite.course import (cell_text, check_exercises, find_exercises, read_notebook, stage_notebooks,
                                student_notebook)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = stage_notebooks(ROOT / 'nbs')


def test_every_stage_notebook_is_numbered_and_found():
    names = [p.name for p in NOTEBOOKS]
    assert names[0] == '00_data.ipynb' and '16_cli.ipynb' in names and len(names) == 17, names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_header_questionnaire_and_graded_exercises(path):
    cells = read_notebook(path)['cells']
    header = '\n'.join(cell_text(c) for c in cells[:4] if c['cell_type'] == 'markdown')
    for part in ('**What you will learn**', '**Comes after**', '**Run time**'):
        assert part in header, f'{path.name}: no {part} in the header'
    assert 'RUNTIME_TBD' not in header, f'{path.name}: the run time was never measured'
    text = '\n'.join(cell_text(c) for c in cells if c['cell_type'] == 'markdown')
    questionnaire = re.search(r'### Questionnaire\n(.*?)(\n### |\Z)', text, re.S)
    assert questionnaire, f'{path.name}: no ### Questionnaire'
    questions = re.findall(r'^\d+\. ', questionnaire.group(1), re.M)
    assert len(questions) >= 5, f'{path.name}: {len(questions)} questions'
    _, exercises = find_exercises(cells)
    assert len(exercises) >= 2, f'{path.name}: {len(exercises)} graded exercises'
    assert all(e.tests for e in exercises), f'{path.name}: an exercise without test cells'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_solutions_pass_and_stubs_fail(path):
    "The grader can fail: each stub fails its tests with its own NotImplementedError; each solution passes."
    results = check_exercises(path)
    bad = [r for r in results if not (r['solution_passes'] and r['stub_fails'])]
    assert results and not bad, json.dumps(bad, indent=1)


def test_student_notebooks_change_only_the_exercise_cells(tmp_path):
    out = tmp_path / 'student'
    result = ok(nnlite('course', 'student', str(out), '--source', str(ROOT / 'nbs')))
    assert f'{len(NOTEBOOKS)} student notebooks' in result.stdout
    assert sorted(p.name for p in out.glob('*.ipynb')) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        source, student = read_notebook(path), read_notebook(out / path.name)
        exercises = find_exercises(source['cells'])[1]
        exercise_cells, test_cells = {e.cell for e in exercises}, {i for e in exercises for i in e.tests}
        heading = next(i for i, c in enumerate(source['cells']) if cell_text(c).startswith('## Exercises'))
        assert len(source['cells']) == len(student['cells'])
        assert student['metadata']['kernelspec']['name'] == 'python3'
        for i, (a, b) in enumerate(zip(source['cells'], student['cells'])):
            if i in exercise_cells:
                assert 'raise NotImplementedError(' in cell_text(b) and cell_text(a) != cell_text(b)
            elif i in test_cells:      # tagged, so that Run All goes past an unsolved exercise
                assert 'raises-exception' in b['metadata']['tags'] and cell_text(a) == cell_text(b)
            elif i == heading:
                assert cell_text(b).startswith(cell_text(a).rstrip()) and 'Run All' in cell_text(b)
            else: assert a == b, f'{path.name} cell {i} changed'
    readme = (out / 'README.md').read_text()
    assert readme.count('\n| `') == sum(len(find_exercises(read_notebook(p)['cells'])[1]) for p in NOTEBOOKS)


def test_grade_a_student_notebook_and_its_solution(tmp_path):
    "An untouched student notebook fails, listing its exercises; the source notebook passes (fresh kernels)."
    name = '01_viz.ipynb'
    source = ROOT / 'nbs' / name
    student = tmp_path / name       # graded from a folder of its own, as a student would have it
    student.write_text(json.dumps(student_notebook(read_notebook(source))))
    exercises = find_exercises(read_notebook(source)['cells'])[1]
    failed = nnlite('course', 'grade', str(student), '--json')
    assert failed.returncode == 1, failed.stderr[-2000:]
    report = json.loads(failed.stdout)
    assert (report['passed'], report['total'], report['all_passed']) == (0, len(exercises), False), report
    assert [g['write'] for g in report['exercises']] == [e.name for e in exercises]
    assert all(g['message'].startswith('NotImplementedError: Exercise ') for g in report['exercises']), report
    assert report['other_errors'] == [], report['other_errors']
    table = nnlite('course', 'grade', str(student))
    assert f'0/{len(exercises)} exercises passed' in table.stdout
    assert table.stdout.count('FAILED') == len(exercises)
    solved = ok(nnlite('course', 'grade', str(source), '--json'))
    report = json.loads(solved.stdout)
    assert report['all_passed'] and report['score'] == f'{len(exercises)}/{len(exercises)}', report


def _toy_notebook(exercise: str, tests: str) -> dict:
    cell = lambda kind, text: {'cell_type': kind, 'metadata': {}, 'source': text,
                               **({'outputs': [], 'execution_count': None} if kind == 'code' else {})}
    return {'cells': [cell('markdown', '# Toy'), cell('markdown', '## Exercises'),
                      cell('code', 'import numpy as np\nfrom fastcore.test import test_eq'),
                      cell('markdown', '### Exercise 1: ramp'), cell('code', exercise), cell('code', tests)],
            'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}


def test_grader_finds_exercises_by_function_names_and_summarises_arrays(tmp_path):
    "A student deleted the exercise mark and the hint, and wrote a wrong array answer: graded, in one line."
    tests = 'test_eq(ramp(30), np.arange(30))'
    source, work = tmp_path / 'src', tmp_path / 'work'
    source.mkdir(); work.mkdir()
    teacher = _toy_notebook('#| exercise\n# Hint: np.arange\ndef ramp(n):\n    return np.arange(n)', tests)
    (source / '05_toy.ipynb').write_text(json.dumps(teacher))
    checked = ok(nnlite('course', 'check', '05_toy', '--source', str(source)))      # a name, as `site --only`
    assert '1/1 exercises' in checked.stdout
    wrong = 'def ramp(n):\n    r = np.arange(n)\n    r[7:] += 1\n    return r'
    (work / '05_toy.ipynb').write_text(json.dumps(_toy_notebook(wrong, tests)))
    result = nnlite('course', 'grade', str(work / '05_toy.ipynb'), '--source', str(source), '--json')
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'WARNING' not in result.stderr and 'Warning' not in result.stderr, result.stderr   # a quiet kernel
    report = json.loads(result.stdout)
    assert (report['passed'], report['total'], report['exercises'][0]['write']) == (0, 1, 'ramp'), report
    assert report['exercises'][0]['message'] == (
        'AssertionError: test_eq: 23 of 30 values differ (shape (30,)); first at index (7,): 8 and 7; '
        'largest difference 1'), report
    (work / '05_toy.ipynb').write_text(json.dumps(_toy_notebook('x = 1', tests)))    # the function is gone
    report = json.loads(nnlite('course', 'grade', str(work / '05_toy.ipynb'), '--source', str(source),
                               '--json').stdout)
    assert report['exercises'][-1] == dict(exercise='ramp', write='ramp', passed=False,
                                           message='no cell of the Exercises section defines ramp'), report


def test_course_errors_are_one_line(tmp_path):
    broken = tmp_path / 'broken.ipynb'; broken.write_text('{"cells": [')
    result = nnlite('course', 'grade', str(broken))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f'nnlite: error: {broken}: not valid JSON'), result.stderr
    plain = tmp_path / 'plain.ipynb'
    plain.write_text(json.dumps({'cells': [], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    result = nnlite('course', 'grade', str(plain))
    assert result.returncode == 1 and 'no graded exercises' in result.stderr, result.stderr
    result = nnlite('course', 'student', str(tmp_path / 'out'), '--source', str(tmp_path / 'nowhere'))
    assert result.returncode == 1 and 'no numbered notebooks' in result.stderr, result.stderr
    result = nnlite('course', 'grade', str(tmp_path / 'missing.ipynb'))
    assert result.returncode == 1 and 'missing.ipynb: notebook not found' in result.stderr, result.stderr


def test_site_pages_of_executed_notebooks(tmp_path):
    "`nnlite course site` runs a notebook and writes its page with the figures embedded, and an index."
    ok(nnlite('course', 'site', str(tmp_path / 'site'), '--only', '01_viz',
              '--source', str(ROOT / 'nbs'), '-q'))
    page = (tmp_path / 'site' / '01_viz.html').read_text()
    assert page.count('data:image/png;base64') >= 3 and 'Traceback' not in page
    assert 'href="01_viz.html"' in (tmp_path / 'site' / 'index.html').read_text()
