"""Training recipes and the fold lock, as a user meets them: the 2018 recipe's plateau rule equals torch's
ReduceLROnPlateau, a 2018 run killed and resumed equals one never interrupted (Adam and the rule's state
included), runs that stop early stay finished, options that do not fit are refused in one line, and a fold
folder is trained by one process at a time (a live holder refuses a second fit, a stale lock is taken over,
Ctrl-C and errors release it)."""
import json
import math
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nnunet_lite.data import make_synthetic_dataset
from nnunet_lite.plans import plan_dataset
from nnunet_lite.preprocessing import preprocess_dataset
from nnunet_lite.training import (LOCK_NAME, MIN_LR, PAPER_LR, EarlyStoppingState, PlateauState, Trainer,
                                  early_stopping_step, learning_rate_stop, load_checkpoint, plateau_step,
                                  read_lock, replay_early_stopping)

from cli_runner import start
from interrupt import interrupt_at

CONFIG = '3d_fullres'
SHORT = dict(iterations=1, val_iterations=1, progress=False)


@pytest.fixture(scope='module')
def tiny3d(tmp_path_factory):
    "5 CT-like cases of ~16x24x24 voxels, planned and preprocessed for 3d_fullres."
    root = tmp_path_factory.mktemp('tiny3d_recipes')
    raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=5, n_test=0, shape=(16, 24, 24), progress=False)
    plans = plan_dataset(raw, root / 'pre', progress=False)
    preprocess_dataset(raw, plans, CONFIG, root / 'pre', progress=False)
    return root / 'pre'


def one_line(error) -> str:
    text = str(error.value)
    assert len(text.splitlines()) == 1, text
    return text


# -- the rules, without training ----------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(4))
def test_plateau_rule_equals_torch_reduce_lr_on_plateau(seed):
    "Fed with the moving average (0.93) of a noisy loss: the same rate every epoch, until it is below 1e-6."
    rng = np.random.default_rng(seed)
    scale, noise = rng.uniform(30, 200), rng.uniform(0.002, 0.05)
    losses = 0.6 * np.exp(-np.arange(1000) / scale) + rng.normal(0, noise, 1000)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PAPER_LR)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', factor=0.2, patience=30,
                                                           threshold=5e-3, threshold_mode='abs')
    state, average = PlateauState(), None
    for epoch, loss in enumerate(losses):
        average = float(loss) if average is None else 0.93 * average + 0.07 * float(loss)
        state = plateau_step(state, float(loss))
        reference.step(average)
        assert math.isclose(state.loss_ema, average, rel_tol=1e-12)
        assert math.isclose(state.lr, optimizer.param_groups[0]['lr'], rel_tol=1e-12), epoch
        if learning_rate_stop(state, epoch): break
    assert state.lr < MIN_LR or epoch == 999


def drops_and_stop(losses):
    "The epochs after which the plateau rule lowers the rate, and the epoch that ends the run (or None)."
    state, drops = PlateauState(), []
    for epoch, loss in enumerate(losses):
        before, state = state.lr, plateau_step(state, loss)
        if state.lr < before: drops.append(epoch)
        if learning_rate_stop(state, epoch): return drops, epoch
    return drops, None


def test_plateau_drops_after_31_epochs_without_improvement_and_stops_at_the_fourth():
    assert drops_and_stop([1.0] * 1000) == ([31, 62, 93, 124], 124)     # flat: no improvement after epoch 0
    # a loss falling by 0.01 an epoch for 100 epochs, then flat: the average lags 0.13 behind and catches up
    # by 0.93^k, improving by 5e-3 steps until epoch 144 (first drop 31 epochs later) and once more, by the
    # last 5e-3 of the lag, at epoch 179 (after the first drop): the next drops come 31 epochs after that
    assert drops_and_stop([1.0 - 0.01 * min(e, 100) for e in range(1000)]) == ([175, 210, 241, 272], 272)
    # a loss that keeps falling never drops the rate: the run goes on to its last epoch
    assert drops_and_stop([1.0 - 0.01 * e for e in range(1000)]) == ([], None)


def test_early_stopping_counts_epochs_without_a_new_high():
    emas = [0.2, 0.5, 0.5, 0.4, float('nan'), 0.51, 0.3, 0.3]
    state = EarlyStoppingState()
    counts = []
    for epoch, value in enumerate(emas):
        state = early_stopping_step(state, value, epoch); counts.append(state.bad_epochs)
    assert counts == [0, 0, 1, 2, 3, 0, 1, 2] and (state.best, state.best_epoch) == (0.51, 5)
    assert replay_early_stopping([{'epoch': e, 'ema_fg_dice': v} for e, v in enumerate(emas)]) == state


# -- the trainer --------------------------------------------------------------------------------------------

def test_options_that_do_not_fit_are_refused_in_one_line(tiny3d, tmp_path):
    cases = [(dict(recipe='adam'), "recipe 'adam': unknown, choose one of v2, paper2018"),
             (dict(recipe='paper2018', cycles=2, epochs=10), 'cycles (2) need the v2 recipe'),
             (dict(patience=5, cycles=2, epochs=10), 'would cut the 2 learning-rate cycles short'),
             (dict(patience=5, val_iterations=0), 'it needs validation iterations (val_iterations is 0)'),
             (dict(patience=0), 'patience 0: must be a whole number of epochs')]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', progress=False, **kwargs)
        assert message in one_line(e)
    assert not (tmp_path / 'fold_0').exists()


def test_paper2018_trainer_uses_adam_and_the_dice_per_sample(tiny3d, tmp_path):
    t = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', recipe='paper2018', progress=False)
    assert type(t.optimizer) is torch.optim.Adam
    assert t.optimizer.defaults['amsgrad'] and t.optimizer.defaults['lr'] == 3e-4
    assert t.optimizer.defaults['weight_decay'] == 3e-5
    assert t.batch_dice is False and t.loss_fn.keywords['batch_dice'] is False
    v2 = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', progress=False)
    assert type(v2.optimizer) is torch.optim.SGD and v2.batch_dice == v2.config.batch_dice


def stoppable(tiny3d, out, stop_at=None, **kwargs):
    "A trainer that raises KeyboardInterrupt once `stop_at` epochs are done (as if Ctrl-C were pressed)."
    return interrupt_at(Trainer(tiny3d, CONFIG, 0, output_dir=out, save_every=1, **SHORT, **kwargs), stop_at)


def test_paper2018_killed_and_resumed_equals_an_uninterrupted_run(tiny3d, tmp_path):
    """5 epochs; the rule is set as if 29 epochs had passed without progress, so the rate drops after epoch 1.
    Stopped after epoch 3 and resumed: the same weights, Adam moments, plateau state and log, bit for bit."""
    preset, dropped = PlateauState(loss_ema=-0.5, best=-0.5, bad_epochs=29), PAPER_LR * 0.2
    whole = stoppable(tiny3d, tmp_path / 'whole', epochs=5, recipe='paper2018')
    whole.plateau = preset
    whole.fit()
    stopped = stoppable(tiny3d, tmp_path / 'stopped', stop_at=3, epochs=5, recipe='paper2018')
    stopped.plateau = preset
    with pytest.raises(KeyboardInterrupt): stopped.fit()
    assert not (tmp_path / 'stopped' / LOCK_NAME).exists()               # Ctrl-C released the lock
    latest = load_checkpoint(tmp_path / 'stopped' / 'checkpoint_latest.pth')
    assert latest['current_epoch'] == 3 and latest['recipe'] == 'paper2018'
    plateau = latest['recipe_state']['plateau']
    assert plateau['lr'] == dropped and plateau['bad_epochs'] == 1
    resumed = stoppable(tiny3d, tmp_path / 'stopped', epochs=5, recipe='paper2018').fit(resume=True)
    assert [r['lr'] for r in whole.log] == [PAPER_LR, PAPER_LR, dropped, dropped, dropped]
    assert [r['lr'] for r in resumed.log] == [r['lr'] for r in whole.log]
    assert [r['train_loss'] for r in resumed.log] == [r['train_loss'] for r in whole.log]
    assert resumed.plateau == whole.plateau and whole.plateau.lr == dropped
    for a, b in zip(whole.network.parameters(), resumed.network.parameters()): assert torch.equal(a, b)
    adam_a, adam_b = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert adam_a['param_groups'] == adam_b['param_groups']
    for i, s in adam_a['state'].items():
        for k, v in s.items(): assert torch.equal(v, adam_b['state'][i][k]), (i, k)
    final = load_checkpoint(tmp_path / 'stopped' / 'checkpoint_final.pth')
    assert final['recipe_state']['plateau'] == {'lr': dropped, 'loss_ema': whole.plateau.loss_ema,
                                                'best': whole.plateau.best, 'bad_epochs': 3}
    assert final['recipe_state']['lr'] == dropped and final['recipe_state']['stop_reason'] is None


def test_a_run_that_stopped_early_stays_finished(tiny3d, tmp_path):
    by_rate = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'rate', epochs=6, recipe='paper2018', **SHORT)
    by_rate.plateau = PlateauState(lr=1.2e-6, loss_ema=-0.5, best=-0.5, bad_epochs=30)
    by_rate.fit()
    assert by_rate.stop_reason == 'learning rate 2.4e-07 < 1e-06 at epoch 0' and len(by_rate.log) == 1
    by_patience = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'patience', epochs=6, patience=2, **SHORT)
    by_patience.early_stopping = EarlyStoppingState(best=1.0, best_epoch=-1)
    by_patience.fit()
    assert by_patience.stop_reason.startswith('validation Dice EMA not improved for 2 epochs')
    for t in (by_rate, by_patience):
        final = load_checkpoint(t.output_dir / 'checkpoint_final.pth')
        assert final['current_epoch'] == len(t.log) and final['recipe_state']['stop_reason'] == t.stop_reason
        assert not (t.output_dir / 'checkpoint_latest.pth').exists()
        assert not (t.output_dir / LOCK_NAME).exists()
        again = Trainer(tiny3d, CONFIG, 0, output_dir=t.output_dir, epochs=12, recipe=t.recipe,
                        patience=t.patience, **SHORT).fit(resume=True)
        assert (again.trained_now, again.epoch, again.stop_reason) == (False, len(t.log), t.stop_reason)
        assert load_checkpoint(t.output_dir / 'checkpoint_final.pth')['current_epoch'] == len(t.log)
        loaded = Trainer(tiny3d, CONFIG, 0, output_dir=t.output_dir, progress=False).load_final()
        assert (loaded.recipe, loaded.patience, loaded.stop_reason) == (t.recipe, t.patience, t.stop_reason)


def test_early_stopping_state_follows_the_log_and_patience_may_change_on_resume(tiny3d, tmp_path, capsys):
    t = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', epochs=3, patience=50, **SHORT).fit()
    assert t.stop_reason is None and t.early_stopping == replay_early_stopping(t.log)
    final = load_checkpoint(tmp_path / 'fold_0' / 'checkpoint_final.pth')
    assert final['patience'] == 50 and EarlyStoppingState(**final['recipe_state']['early_stopping']) == \
        t.early_stopping
    again = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', epochs=4, patience=1, **SHORT)
    again.fit(resume=True)
    assert 'trained with patience 50, continuing with 1' in capsys.readouterr().out
    assert again.early_stopping == replay_early_stopping(again.log)
    assert again.epoch == 4 or again.stop_reason.startswith('validation Dice EMA not improved for 1 epochs')


def test_resuming_with_another_recipe_is_refused_naming_the_checkpoint(tiny3d, tmp_path):
    Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', epochs=1, **SHORT).fit()
    with pytest.raises(ValueError) as e:
        Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', epochs=2, recipe='paper2018',
                **SHORT).fit(resume=True)
    assert one_line(e).startswith(f"{tmp_path / 'fold_0' / 'checkpoint_final.pth'}: was trained with the v2 "
                                  f"recipe, not paper2018")
    assert not (tmp_path / 'fold_0' / LOCK_NAME).exists()


# -- the lock -----------------------------------------------------------------------------------------------

def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({'pid': pid, 'host': host or socket.gethostname(),
                                                'started': '2024-05-01 12:00:00'}))


def test_a_live_holder_refuses_a_second_fit_and_a_gone_one_is_taken_over(tiny3d, tmp_path, capsys):
    out = tmp_path / 'fold_0'
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        write_lock(out, holder.pid)
        with pytest.raises(FileExistsError) as e:
            Trainer(tiny3d, CONFIG, 0, output_dir=out, epochs=1, **SHORT).fit()
        assert one_line(e).startswith(f"{out / LOCK_NAME}: this fold is being trained by process "
                                      f"{holder.pid} on {socket.gethostname()} since 2024-05-01 12:00:00")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]    # nothing written
        assert read_lock(out / LOCK_NAME)['pid'] == holder.pid          # and the lock left alone
    finally:
        holder.kill(); holder.wait()
    capsys.readouterr()
    t = Trainer(tiny3d, CONFIG, 0, output_dir=out, epochs=1, **SHORT).fit()   # its process is gone: stale
    assert f"{out / LOCK_NAME}: taking over the lock of process {holder.pid}" in capsys.readouterr().out
    assert t.epoch == 1 and (out / 'checkpoint_final.pth').exists() and not (out / LOCK_NAME).exists()


def test_a_lock_of_another_machine_is_never_taken_over(tiny3d, tmp_path):
    out = tmp_path / 'fold_0'
    write_lock(out, 1, host='another-machine.example')
    with pytest.raises(FileExistsError) as e:
        Trainer(tiny3d, CONFIG, 0, output_dir=out, epochs=1, **SHORT).fit(resume=True)
    assert 'by process 1 on another-machine.example since' in one_line(e)
    assert (out / LOCK_NAME).exists()


def test_an_error_during_fit_releases_the_lock(tiny3d, tmp_path):
    t = Trainer(tiny3d, CONFIG, 0, output_dir=tmp_path / 'fold_0', epochs=3, **SHORT)
    seen = []
    def after_epoch(row):
        seen.append(read_lock(tmp_path / 'fold_0' / LOCK_NAME))
        raise RuntimeError('disk full')
    t.after_epoch = after_epoch
    with pytest.raises(RuntimeError, match='disk full'): t.fit()
    assert seen[0]['pid'] == __import__('os').getpid() and seen[0]['host'] == socket.gethostname()
    assert not (tmp_path / 'fold_0' / LOCK_NAME).exists()


def wait_for_lock(path, pid, proc, timeout=300):
    start_time = time.time()
    while read_lock(path).get('pid') != pid:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start_time < timeout, f'{path} never named process {pid}'
        time.sleep(0.2)


def test_a_training_process_holds_the_lock_until_ctrl_c_and_kill_9_leaves_it_stale(tiny3d, tmp_path, capsys):
    "`nnlite train` in another process: a second fit is refused; Ctrl-C removes the lock; kill -9 leaves it."
    model = tmp_path / 'model'
    lock = model / 'fold_0' / LOCK_NAME
    args = ('train', tiny3d, '-c', CONFIG, '-f', 0, '--epochs', 1000, '--iters', 1, '--val-iters', 1,
            '-o', model, '-q', '--no-validation')
    env = {'OMP_NUM_THREADS': '1'}
    proc = start(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(lock, proc.pid, proc)
        with pytest.raises(FileExistsError) as e:
            Trainer(tiny3d, CONFIG, 0, output_dir=model / 'fold_0', epochs=1, **SHORT).fit(resume=True)
        assert f'this fold is being trained by process {proc.pid}' in one_line(e)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and 'interrupted' in err, err
        assert not lock.exists()
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    proc = start(*args, '--resume', env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_lock(lock, proc.pid, proc)
        proc.kill(); proc.wait()
        assert read_lock(lock)['pid'] == proc.pid                      # left behind: stale
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    capsys.readouterr()
    t = Trainer(tiny3d, CONFIG, 0, output_dir=model / 'fold_0', epochs=1, **SHORT)
    t.fit(resume=True)
    assert f'taking over the lock of process {proc.pid}' in capsys.readouterr().out
    assert not lock.exists()


def test_the_train_command_takes_recipes_early_stopping_and_pretrained_weights(tiny3d, tmp_path):
    "nnlite train --recipe / --early-stopping / --pretrained-weights, as a user types them."
    from cli_runner import nnlite
    short = ('-c', CONFIG, '-f', 'all', '--epochs', 3, '--iters', 1, '--val-iters', 1, '--no-validation',
             '--device', 'cpu', '-q')
    r = nnlite('train', tiny3d, *short, '--recipe', 'paper2018', '--early-stopping', 1, '-o', tmp_path / 'a')
    assert r.returncode == 0, r.stderr
    assert 'recipe paper2018, early stopping after 1 epochs' in r.stdout, r.stdout
    checkpoint = load_checkpoint(tmp_path / 'a' / 'fold_all' / 'checkpoint_final.pth')
    assert checkpoint['recipe'] == 'paper2018' and checkpoint['patience'] == 1
    if checkpoint['recipe_state']['stop_reason']:
        assert f"stopped early: {checkpoint['recipe_state']['stop_reason']}" in r.stdout, r.stdout
    r = nnlite('train', tiny3d, *short, '--pretrained-weights', tmp_path / 'a' / 'fold_all' /
               'checkpoint_final.pth', '-o', tmp_path / 'b')
    assert r.returncode == 0 and 'from the weights of' in r.stdout, r.stdout + r.stderr
    missing = tmp_path / 'nothing.pth'
    r = nnlite('train', tiny3d, *short, '--pretrained-weights', missing, '-o', tmp_path / 'c')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'nothing.pth' in r.stderr
    r = nnlite('train', tiny3d, *short, '--recipe', 'paper2018', '--cyclic', 2, '-o', tmp_path / 'd')
    assert r.returncode == 1 and 'learning-rate cycles (2) need the v2 recipe' in r.stderr, r.stderr
