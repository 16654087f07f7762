"""The notebooks seen working in a real JupyterLab: headless Chromium (Debian's `chromium`, driven by
Playwright) opens the slice-viewer and plan-explorer notebooks, runs them, moves a slider and checks the
figure changed. Screenshots are kept in `artifacts/browser/` (or $NNLITE_ARTIFACTS/browser). A missing browser
skips, unless NNLITE_REQUIRE_BROWSER=1 (as in .ci/run), where it fails."""
import json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get('NNLITE_ARTIFACTS', ROOT / 'artifacts')) / 'browser'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def _require(what: str):
    if os.environ.get('NNLITE_REQUIRE_BROWSER') == '1': pytest.fail(f'{what} (NNLITE_REQUIRE_BROWSER=1)')
    pytest.skip(what)


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server on localhost over a copy of the two notebooks (so autosave never touches nbs/)."
    if CHROMIUM is None: _require('no chromium on PATH (apt-get install chromium)')
    try: import playwright.sync_api  # noqa: F401
    except ImportError: _require('playwright is not installed (the dev extra has it)')
    root = tmp_path_factory.mktemp('lab')
    for name in ('01_viz.ipynb', '03_plans.ipynb'):   # with a kernelspec: JupyterLab starts it without asking
        nb = json.loads((ROOT / 'nbs' / name).read_text(encoding='utf-8'))
        nb['metadata']['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
        (root / name).write_text(json.dumps(nb), encoding='utf-8')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    token = 'nnlite-browser-test'
    settings = root / '.lab-settings' / '@jupyterlab' / 'apputils-extension'   # no news or update pop-ups
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    notebook = settings.parent / 'notebook-extension'   # every cell in the page, not only those scrolled to
    notebook.mkdir()
    (notebook / 'tracker.jupyterlab-settings').write_text('{"windowingMode": "none"}')
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(root / '.jupyter'),
           'JUPYTERLAB_SETTINGS_DIR': str(root / '.lab-settings'),
           'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    server = subprocess.Popen(
        [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
         f'--ServerApp.root_dir={root}', f'--IdentityProvider.token={token}', '--allow-root',
         '--LabApp.expose_app_in_browser=True'],
        cwd=root, env=env, stdout=open(root / 'server.log', 'w'), stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail(f'JupyterLab did not start:\n{(root / "server.log").read_text()[-3000:]}')
        yield url, token, root
    finally:
        server.terminate()
        try: server.wait(20)
        except subprocess.TimeoutExpired: server.kill()


def run_notebook_in_lab(page, url, token, name, timeout_s=600):
    "Open a notebook in JupyterLab, run all its cells and wait until none is running or queued."
    page.goto(f'{url}/lab/tree/{name}?reset&token={token}')   # reset: a fresh workspace, this notebook alone
    page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=120_000)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session",
                           timeout=120_000)
    page.wait_for_function("window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus"
                           " === 'idle'", timeout=120_000)
    page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell').first.click()   # make it the active one
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # done when every code cell of this notebook shows its execution count, [n]:
    page.wait_for_function(
        "(() => { const p = [...document.querySelectorAll("
        "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];"
        " return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)) })()",
        timeout=timeout_s * 1000)
    errors = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)'
                          ' .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
                          ' pre:has-text("Traceback")')
    return errors.count()


def move_slider_and_compare(page, description, keys, shot):
    "Press keys on the first slider labelled `description`; return the output image's src before and after."
    panel = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)')
    slider = panel.locator('.widget-slider', has=page.locator(f'label:text-is("{description}")')).first
    slider.scroll_into_view_if_needed()
    box = slider.locator('xpath=ancestor::div[contains(@class,"widget-vbox")][1]')
    image = box.locator('.widget-output img').first
    image.wait_for(timeout=60_000)
    before = image.get_attribute('src')
    box.screenshot(path=str(ARTIFACTS / f'{shot}_before.png'))
    handle = slider.locator('.noUi-handle').first
    handle.focus()
    for key in keys: handle.press(key); page.wait_for_timeout(150)
    page.wait_for_function("([el, src]) => { const i = el.querySelector('.widget-output img');"
                           " return i && i.getAttribute('src') !== src }",
                           arg=[box.element_handle(), before], timeout=60_000)
    page.wait_for_function("el => [...el.querySelectorAll('.widget-output img')]"
                           ".every(i => i.complete && i.naturalWidth)",
                           arg=box.element_handle(), timeout=30_000)
    page.wait_for_timeout(1000)
    box.scroll_into_view_if_needed()
    box.screenshot(path=str(ARTIFACTS / f'{shot}_after.png'))
    return before, box.locator('.widget-output img').first.get_attribute('src')


@pytest.mark.parametrize('name, description, keys', [
    ('01_viz.ipynb', 'slice', ['ArrowRight'] * 3),
    ('03_plans.ipynb', 'GPU GB', ['Home']),
])
def test_widget_in_jupyterlab(lab, name, description, keys):
    from playwright.sync_api import sync_playwright
    url, token, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = name.removesuffix('.ipynb')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu'])
        page = browser.new_page(viewport={'width': 1400, 'height': 1400})
        try:
            errors = run_notebook_in_lab(page, url, token, name)
            page.screenshot(path=str(ARTIFACTS / f'{stem}_ran.png'))
            assert errors == 0, (f'{name}: {errors} cell(s) raised in JupyterLab '
                                 f'(see {ARTIFACTS}/{stem}_ran.png)')
            before, after = move_slider_and_compare(page, description, keys, stem)
            changed = before and after and before != after
            assert changed, f'{name}: the figure did not change after moving {description!r}'
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f'{stem}_failure.png'))
            for text in page.locator('.jp-OutputArea-output').all_inner_texts():
                if 'Error' in text: print(text[-2000:])
            print((root / 'server.log').read_text()[-3000:])
            raise
        finally:
            browser.close()
