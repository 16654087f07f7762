"""The trainer as a user runs it: it learns, it resumes a killed run exactly, it trains with torchrun on 2
gloo processes, and the `nnlite train` command gives one-line errors."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from nnunet_lite.plans import plan_dataset
from nnunet_lite.data import make_synthetic_dataset
from nnunet_lite.preprocessing import preprocess_dataset
from nnunet_lite.network import reference_key, reference_state_dict
from nnunet_lite.training import Trainer, load_checkpoint, save_checkpoint

from cli_runner import environment, nnlite, start
from interrupt import interrupt_at


def preprocessed(root: Path, kind: str, configuration: str, **synth) -> Path:
    raw = make_synthetic_dataset(root / 'raw', kind, n_test=0, progress=False, **synth)
    pre = root / 'pre'
    plans = plan_dataset(raw, pre, progress=False)
    preprocess_dataset(raw, plans, configuration, pre, progress=False)
    return pre


@pytest.fixture(scope='module')
def tiny3d(tmp_path_factory):
    "5 CT-like cases of ~16x24x24 voxels, planned and preprocessed for 3d_fullres (batch 2)."
    return preprocessed(tmp_path_factory.mktemp('tiny3d'), 'ct', '3d_fullres', n_train=5, shape=(16, 24, 24))


def test_a_few_hundred_iterations_reach_dice_08(tmp_path):
    "An easy 2D set (one large organ, little noise): 300 iterations give a validation pseudo Dice above 0.8."
    pre = preprocessed(tmp_path, 'ct2d', '2d', n_train=6, n_classes=1, noise=0.3)
    trainer = Trainer(pre, '2d', fold=0, epochs=20, iterations=15, val_iterations=5, progress=False).fit()
    log = pd.read_csv(trainer.output_dir / 'log.csv')
    assert len(log) == 20
    assert log.train_loss.iloc[-3:].mean() < log.train_loss.iloc[:3].mean() - 0.5
    assert log.mean_fg_dice.iloc[-3:].mean() > 0.8, log[['epoch', 'train_loss', 'mean_fg_dice']]


def weights_of(path):
    return load_checkpoint(path)['network_weights']


def test_killed_run_resumes_exactly(tiny3d, tmp_path):
    """Kill -9 a run mid-training (after its 2nd checkpoint), resume it: the final weights, optimiser state
    and log equal those of a run that was never interrupted, bit for bit."""
    args = [tiny3d, '-c', '3d_fullres', '-f', '0', '--epochs', 7, '--iters', 3, '--val-iters', 1,
            '--save-every', 1, '-q']
    env = {'OMP_NUM_THREADS': '2'}
    whole = nnlite('train', *args, '-o', tmp_path / 'whole', env=env)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / 'killed'
    proc = start('train', *args, '-o', out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest, deadline = out / 'fold_0' / 'checkpoint_latest.pth', time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            try:
                if load_checkpoint(latest)['current_epoch'] >= 2: break
            except ValueError:
                pass
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = load_checkpoint(latest)['current_epoch']
    assert 2 <= killed_at < 7 and not (out / 'fold_0' / 'checkpoint_final.pth').exists()

    resumed = nnlite('train', *args, '-o', out, '--resume', env=env)
    assert resumed.returncode == 0, resumed.stderr
    out = out / 'fold_0'
    a = load_checkpoint(tmp_path / 'whole' / 'fold_0' / 'checkpoint_final.pth')
    b = load_checkpoint(out / 'checkpoint_final.pth')
    assert a['current_epoch'] == b['current_epoch'] == 7
    for k in a['network_weights']: assert torch.equal(a['network_weights'][k], b['network_weights'][k]), k
    for (i, s), (j, t) in zip(a['optimizer_state']['state'].items(), b['optimizer_state']['state'].items()):
        assert torch.equal(s['momentum_buffer'], t['momentum_buffer'])
    strip = lambda log: [{k: v for k, v in r.items() if k != 'epoch_time'} for r in log]
    assert strip(a['log']) == strip(b['log'])
    assert pd.read_csv(out / 'log.csv').epoch.tolist() == list(range(7))
    assert not (out / 'checkpoint_latest.pth').exists() and not list(out.glob('.*.tmp'))

    again = nnlite('train', *args, '-o', out.parent, '--resume', env=env)    # a finished run: nothing to do
    assert again.returncode == 0 and 'epoch 6' in again.stdout
    for k, v in weights_of(out / 'checkpoint_final.pth').items():
        assert torch.equal(v, b['network_weights'][k])


def test_checkpoint_has_everything_to_resume_and_predict(tiny3d, tmp_path):
    trainer = Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'run', epochs=2, iterations=2,
                      val_iterations=1, progress=False).fit()
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint_final.pth', weights_only=True)
    assert {'network_weights', 'optimizer_state', 'grad_scaler_state', 'current_epoch', 'schedule', 'log',
            '_best_ema', 'rng_state', 'init_args', 'trainer_name',
            'inference_allowed_mirroring_axes'} <= set(ckpt)
    args = ckpt['init_args']
    assert args['plans'] == json.loads((tiny3d / 'plans.json').read_text())
    assert args['configuration'] == '3d_fullres'
    assert args['dataset_json'] == json.loads((tiny3d / 'dataset.json').read_text()) and args['fold'] == 0
    assert ckpt['schedule']['epochs'] == 2 and ckpt['current_epoch'] == 2 and len(ckpt['log']) == 2
    for k, v in reference_state_dict(trainer.network).items():
        assert torch.equal(ckpt['network_weights'][k], v)
    with pytest.raises(ValueError, match='holds checkpoints of an earlier run'):    # never overwritten
        Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'run', epochs=2, iterations=1,
                progress=False).fit()
    model_dir = tmp_path                  # plans and dataset.json beside the fold folder: a model folder
    assert (model_dir / 'plans.json').exists() and (model_dir / 'dataset.json').exists()
    assert (tmp_path / 'run' / 'progress.png').stat().st_size > 0
    # the folds come from splits_final.json beside the plans
    splits = json.loads((tiny3d / 'splits_final.json').read_text())
    assert sorted(trainer.val_cases) == sorted(splits[0]['val'])


def test_resume_refuses_other_plans(tiny3d, tmp_path):
    Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'fold_0', epochs=2, iterations=1, val_iterations=0,
            save_every=1, progress=False).fit()
    t = Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'fold_0', epochs=3, iterations=1,
                val_iterations=0, progress=False)
    t.plans = {**t.plans, 'plans_name': 'other'}
    with pytest.raises(ValueError, match='other plans'): t.fit(resume=True)


def test_killed_after_the_last_best_checkpoint_still_finishes(tiny3d, tmp_path):
    "Killed after saving checkpoint_best of its last epoch, before checkpoint_final: resume writes the final."
    short = dict(epochs=2, iterations=1, val_iterations=1, progress=False)
    Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'fold_0', **short).fit()
    final = tmp_path / 'fold_0' / 'checkpoint_final.pth'
    state = load_checkpoint(final); final.unlink()
    save_checkpoint(tmp_path / 'fold_0' / 'checkpoint_best.pth', state)
    Trainer(tiny3d, '3d_fullres', 0, output_dir=tmp_path / 'fold_0', **short).fit(resume=True)
    assert load_checkpoint(final)['current_epoch'] == 2


def test_cli_train_errors_are_one_line(tiny3d, tmp_path):
    r = nnlite('train', tmp_path / 'nowhere', '-q')
    assert r.returncode == 1 and r.stderr.startswith('nnlite: error:'), r.stderr
    assert 'plans.json: plans file not found (train on the folder `nnlite preprocess` wrote)' in r.stderr
    r = nnlite('train', tiny3d, '-c', '3d_fullres', '-f', '7', '-q', '-o', tmp_path / 'x')
    assert r.returncode == 1 and 'fold 7 does not exist' in r.stderr
    r = nnlite('train', tiny3d, '-c', '2d', '-q', '-o', tmp_path / 'x')
    assert r.returncode == 1 and "run `nnlite preprocess" in r.stderr
    (tmp_path / 'bad' / 'fold_0').mkdir(parents=True)
    (tmp_path / 'bad' / 'fold_0' / 'checkpoint_latest.pth').write_bytes(b'\0' * 100)
    r = nnlite('train', tiny3d, '-c', '3d_fullres', '-o', tmp_path / 'bad', '--resume', '-q')
    assert r.returncode == 1 and 'checkpoint_latest.pth: not a readable checkpoint' in r.stderr
    r = nnlite('train', tiny3d, '-f', 'x')
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("fold must be a number or 'all', not 'x'")


DDP_WORKER = '''
import sys, torch, torch.distributed as dist
from nnunet_lite.training import Trainer, init_distributed
rank, world = init_distributed('cpu')
pre, out = sys.argv[1], sys.argv[2]
t = Trainer(pre, '3d_fullres', 0, output_dir=out, epochs=2, iterations=3, val_iterations=1, device='cpu',
            progress=False)
train, val = t.batch_streams(); first = next(train); train.close(); val.close()
t.fit()
torch.save({'weights': t.network.state_dict(), 'batch': first['data'], 'keys': first['keys']},
           f"{out}/rank{rank}.pt")
dist.destroy_process_group()
'''


def torchrun(*args, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=environment({'OMP_NUM_THREADS': '1'}))


def test_ddp_two_gloo_processes_hold_identical_weights(tiny3d, tmp_path):
    (tmp_path / 'worker.py').write_text(DDP_WORKER)
    r = torchrun('worker.py', tiny3d, tmp_path / 'out', tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / 'out' / f'rank{i}.pt', weights_only=True) for i in range(2))
    assert a['batch'].shape[0] == b['batch'].shape[0] == 1            # the plan's batch of 2 over 2 ranks
    assert not torch.equal(a['batch'], b['batch'])                    # each rank samples its own patches
    for k in a['weights']: assert torch.equal(a['weights'][k], b['weights'][k]), k
    final = load_checkpoint(tmp_path / 'out' / 'checkpoint_final.pth')
    assert final['world_size'] == 2 and final['current_epoch'] == 2
    for k in a['weights']: assert torch.equal(final['network_weights'][reference_key(k)], a['weights'][k])


def test_torchrun_cli_train(tiny3d, tmp_path):
    out = tmp_path / 'model'
    r = torchrun('-m', 'nnunet_lite.cli', 'train', tiny3d, '-c', '3d_fullres', '-f', '1', '--epochs', 2,
                 '--iters', 2, '--val-iters', 1, '--device', 'cpu', '-o', out, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 alone speaks
    assert r.stdout.count('training 3d_fullres fold 1') == 1 and 'x 2 processes' in r.stdout
    assert (out / 'fold_1' / 'checkpoint_final.pth').exists()
    assert len(pd.read_csv(out / 'fold_1' / 'log.csv')) == 2
    assert (out / 'plans.json').exists() and (out / 'dataset.json').exists()


BATCH_DICE_WORKER = '''
import sys, torch, torch.distributed as dist
from nnunet_lite.training import dice_ce_loss, init_distributed
rank, world = init_distributed('cpu')
g = torch.Generator().manual_seed(0)
logits, target = torch.randn(4, 3, 6, 5, 7, generator=g), torch.randint(0, 3, (4, 1, 6, 5, 7), generator=g)
whole = logits.clone().requires_grad_()
loss = dice_ce_loss(whole, target, batch_dice=True); loss.backward()          # one process, the whole batch
part = logits[2 * rank:2 * rank + 2].clone().requires_grad_()                 # this rank's half
ranked = dice_ce_loss(part, target[2 * rank:2 * rank + 2], batch_dice=True, all_ranks=True); ranked.backward()
mean = ranked.detach().clone(); dist.all_reduce(mean); mean /= world
assert torch.allclose(mean, loss, atol=1e-6), (mean, loss)              # DDP's mean loss = the whole batch's
assert torch.allclose(part.grad / world, whole.grad[2 * rank:2 * rank + 2], atol=1e-7)   # and its gradients
print('ok', rank)
dist.destroy_process_group()
'''


def test_batch_dice_over_ranks_equals_one_process(tmp_path):
    "Batch Dice summed over 2 processes (SumOverRanks): the averaged loss and gradients equal one process's."
    (tmp_path / 'worker.py').write_text(BATCH_DICE_WORKER)
    r = torchrun('worker.py', tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('ok') == 2            # both ranks reached the end (their lines may interleave)


def test_two_datasets_never_share_a_model_folder(tiny3d, tmp_path):
    """Sibling preprocessed folders train into model folders of their own by default, and a model folder that
    holds another dataset's plans is refused with one line before anything is written."""
    other = preprocessed(tmp_path, 'ct', '3d_fullres', n_train=5, shape=(16, 28, 20), seed=3)
    args = ('-c', '3d_fullres', '-f', 'all', '--epochs', 1, '--iters', 1, '--val-iters', 0,
            '--no-validation', '-q')
    assert nnlite('train', other, *args).returncode == 0
    assert (other / 'results' / '3d_fullres' / 'fold_all' / 'checkpoint_final.pth').is_file()
    assert not (other.parent / 'results').exists()
    model = other / 'results' / '3d_fullres'
    r = nnlite('train', tiny3d, *args[:2], '-f', 0, *args[4:], '-o', model)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{model / 'plans.json'}: this model folder holds other plans" in r.stderr
    assert len(list(model.glob('fold_*'))) == 1


def test_cyclic_run_resumed_mid_cycle_equals_an_uninterrupted_one(tiny3d, tmp_path):
    """10 epochs with 2 cycles (poly 0-4, cycles 5-7 and 8-9): a run stopped after epoch 6, in the middle of
    the first cycle, then resumed, gives the same snapshots and final weights, bit for bit, as a run never
    stopped."""
    def run(out, stop_at=None):
        return interrupt_at(Trainer(tiny3d, '3d_fullres', 0, output_dir=out, epochs=10, iterations=2,
                                    val_iterations=1, save_every=1, progress=False, cycles=2), stop_at)
    run(tmp_path / 'whole').fit()
    with pytest.raises(KeyboardInterrupt): run(tmp_path / 'stopped', stop_at=7).fit()
    assert load_checkpoint(tmp_path / 'stopped' / 'checkpoint_latest.pth')['current_epoch'] == 7
    assert not list((tmp_path / 'stopped').glob('checkpoint_snapshot_*'))
    run(tmp_path / 'stopped').fit(resume=True)
    for name in ('checkpoint_snapshot_1.pth', 'checkpoint_snapshot_2.pth', 'checkpoint_final.pth'):
        a, b = load_checkpoint(tmp_path / 'whole' / name), load_checkpoint(tmp_path / 'stopped' / name)
        assert a['current_epoch'] == b['current_epoch'], name
        for k in a['network_weights']:
            assert torch.equal(a['network_weights'][k], b['network_weights'][k]), (name, k)
    assert load_checkpoint(tmp_path / 'whole' / 'checkpoint_snapshot_1.pth')['current_epoch'] == 8
    lrs = [r['lr'] for r in load_checkpoint(tmp_path / 'stopped' / 'checkpoint_final.pth')['log']]
    assert lrs[5] > lrs[6] > lrs[7] < lrs[8] > lrs[9]          # two cycles, each decaying to its snapshot


def test_cli_cyclic_needs_room_for_its_cycles(tiny3d, tmp_path):
    r = nnlite('train', tiny3d, '-c', '3d_fullres', '-f', 0, '--epochs', 4, '--cyclic', 3,
               '-o', tmp_path / 'm', '-q')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert '3 learning-rate cycles need at least 6 epochs' in r.stderr
