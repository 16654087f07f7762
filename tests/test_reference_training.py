"""Loss, deep-supervision weights, learning rate, folds and the training step against nnU-Net v2's own
classes."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_lite.dataloading import OVERSAMPLE_FOREGROUND
from nnunet_lite.training import (EPOCHS, ITERATIONS, SAVE_EVERY, VAL_ITERATIONS, crossval_splits,
                                  deep_supervision_loss, deep_supervision_weights, dice_ce_loss,
                                  make_optimizer, poly_lr, pseudo_dice, region_dice_bce_loss, set_lr,
                                  tp_fp_fn)

from reference_oracle import require_reference  # noqa: E402
require_reference()
from reference_oracle import make_fingerprint, reference_plans, reference_trainer  # noqa: E402
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler  # noqa: E402
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402


def reference_ce_dice(batch_dice, ignore_label=None):
    return DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 6, 7, 5), (3, 3, 9, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_dice_ce_equals_reference(batch_dice, shape, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    target[0] = 0                                      # a sample without foreground
    ours = dice_ce_loss(logits, target, batch_dice)
    theirs = reference_ce_dice(batch_dice)(logits, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # and the gradients
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    dice_ce_loss(a, target, batch_dice).backward(); reference_ce_dice(batch_dice)(b, target).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_ce_with_ignore_label_equals_reference(batch_dice):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, 5, generator=g)
    target = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)          # label 3 = ignore
    torch.testing.assert_close(dice_ce_loss(logits, target, batch_dice, ignore_label=3),
                               reference_ce_dice(batch_dice, 3)(logits, target), rtol=1e-5, atol=1e-6)
    all_ignored = torch.full_like(target, 3)
    torch.testing.assert_close(dice_ce_loss(logits, all_ignored, batch_dice, ignore_label=3),
                               torch.as_tensor(reference_ce_dice(batch_dice, 3)(logits, all_ignored),
                                               dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("has_ignore", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_loss_equals_reference(has_ignore, batch_dice):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 6, 7, generator=g)
    target = torch.rand(2, 3 + has_ignore, 5, 6, 7, generator=g) > 0.6
    ref = DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': 1e-5, 'ddp': False},
                          use_ignore_label=has_ignore, dice_class=MemoryEfficientSoftDiceLoss)
    torch.testing.assert_close(region_dice_bce_loss(logits, target, batch_dice, has_ignore),
                               ref(logits, target), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def trainer_for():
    """trainer_for(n_outputs=None): nnUNetTrainer for the reference's plans of a 64³ CT-like dataset (not
    initialised: nothing to train on); with `n_outputs`, its 3d_fullres network has that many deep-supervision
    outputs (one pooling stage more)."""
    fingerprint, dataset_json = make_fingerprint((1.0, 1.0, 1.0), (64, 64, 64), num_cases=10)
    plans = reference_plans(fingerprint, dataset_json)

    def make(n_outputs=None):
        p = copy.deepcopy(plans)
        if n_outputs is not None:
            strides = [[1, 1, 1]] + [[2, 2, 2]] * n_outputs
            p['configurations']['3d_fullres']['architecture']['arch_kwargs']['strides'] = strides
        return reference_trainer(p, '3d_fullres', dataset_json)
    return make


def test_deep_supervision_weights_by_hand():
    "1/2^i per output, full resolution first, the lowest output left out (0), normalised to sum 1."
    np.testing.assert_allclose(deep_supervision_weights(2), [1, 0])
    np.testing.assert_allclose(deep_supervision_weights(3), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(deep_supervision_weights(5), [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_deep_supervision_equals_reference(trainer_for, n):
    "The weights of the DeepSupervisionWrapper the reference trainer builds, and the loss with them."
    reference_loss = trainer_for(n)._build_loss()
    assert isinstance(reference_loss, DeepSupervisionWrapper)
    weights = reference_loss.weight_factors
    assert len(weights) == n
    np.testing.assert_allclose(deep_supervision_weights(n), weights, rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(n)
    outputs = [torch.randn(2, 3, 16 // 2 ** i, 16 // 2 ** i, generator=g) for i in range(n)]
    targets = [torch.randint(0, 3, (2, 1, 16 // 2 ** i, 16 // 2 ** i), generator=g) for i in range(n)]
    ref = DeepSupervisionWrapper(reference_ce_dice(True), weights)(outputs, targets)
    torch.testing.assert_close(deep_supervision_loss(outputs, targets, lambda o, t: dice_ce_loss(o, t, True)),
                               ref, rtol=1e-5, atol=1e-6)


def test_poly_lr_and_optimizer_equal_reference(trainer_for):
    """The SGD optimiser (learning rate, momentum, Nesterov, weight decay) and the poly schedule of the
    reference trainer's configure_optimizers, and its schedule's other defaults (epochs, iterations,
    checkpoints, foreground oversampling)."""
    trainer = trainer_for()
    trainer.network = torch.nn.Linear(3, 2)
    theirs, scheduler = trainer.configure_optimizers()
    ours = make_optimizer(torch.nn.Linear(3, 2).parameters())
    for key in ('lr', 'momentum', 'weight_decay', 'nesterov', 'dampening'):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    assert ours.param_groups[0]['lr'] == trainer.initial_lr
    assert (EPOCHS, ITERATIONS, VAL_ITERATIONS, SAVE_EVERY, OVERSAMPLE_FOREGROUND) == (
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
        trainer.save_every, trainer.oversample_foreground_percent)
    assert isinstance(scheduler, PolyLRScheduler)
    for epoch in range(trainer.num_epochs):
        scheduler.step(epoch); set_lr(ours, poly_lr(epoch, EPOCHS))
        assert ours.param_groups[0]['lr'] == pytest.approx(theirs.param_groups[0]['lr'], rel=1e-12)


@pytest.mark.parametrize("n", [5, 6, 12, 13, 37, 100])
def test_splits_equal_reference(n):
    rng = np.random.default_rng(n)
    ids = [f'case_{i:04d}' for i in rng.permutation(n)]   # any order in: both sort first
    ref = generate_crossval_split(sorted(ids), seed=12345, n_splits=5)
    ours = crossval_splits(ids)
    assert [s['val'] for s in ours] == [list(map(str, s['val'])) for s in ref]
    assert [s['train'] for s in ours] == [list(map(str, s['train'])) for s in ref]


def test_pseudo_dice_equals_reference_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 1, 8, 8, 8), generator=g)
    tp, fp, fn = tp_fp_fn(logits, target)
    # the reference's validation_step: argmax, one-hot, tp/fp/fn over batch and voxels, background dropped
    from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
    pred = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1)
    rtp, rfp, rfn, _ = get_tp_fp_fn_tn(pred, target, axes=[0, 2, 3, 4])
    np.testing.assert_array_equal(tp.numpy(), rtp[1:].numpy())
    np.testing.assert_array_equal(fp.numpy(), rfp[1:].numpy())
    np.testing.assert_array_equal(fn.numpy(), rfn[1:].numpy())
    r = rtp[1:].numpy(); expected = 2 * r / (2 * r + rfp[1:].numpy() + rfn[1:].numpy())
    np.testing.assert_allclose(pseudo_dice(tp, fp, fn), expected)


@pytest.fixture(scope='module')
def tiny_preprocessed(tmp_path_factory):
    from nnunet_lite.plans import plan_dataset
    from nnunet_lite.data import make_synthetic_dataset
    from nnunet_lite.preprocessing import preprocess_dataset
    root = tmp_path_factory.mktemp('trainer_vs_reference')
    raw = make_synthetic_dataset(root / 'raw', 'ct', n_train=5, n_test=0, shape=(16, 24, 24), progress=False)
    plans = plan_dataset(raw, root / 'pre', progress=False)
    preprocess_dataset(raw, plans, '3d_fullres', root / 'pre', progress=False)
    return root / 'pre'


def test_trainer_steps_equal_reference_trainer(tiny_preprocessed, tmp_path, monkeypatch):
    """nnUNetTrainer and our Trainer (float32) from the same weights on the same batches: the same training
    losses, the same weights after 3 SGD steps (loss, deep supervision, clipping, Nesterov, weight decay), the
    same validation loss and TP/FP/FN."""
    import json
    from nnunet_lite.network import load_reference_weights
    from nnunet_lite.training import Trainer
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, str(tmp_path / var))
    plans = json.loads((tiny_preprocessed / 'plans.json').read_text())
    dataset_json = json.loads((tiny_preprocessed / 'dataset.json').read_text())
    ref = nnUNetTrainer({**plans, 'continue_training': False}, '3d_fullres', 0, dataset_json,
                        device=torch.device('cpu'))
    ref.print_to_log_file = lambda *a, **k: None
    folder = Path(ref.preprocessed_dataset_folder)   # initialize() only looks at the file endings there
    folder.mkdir(parents=True); (folder / 'case_000.b2nd').touch()
    ref.initialize()
    ours = Trainer(tiny_preprocessed, '3d_fullres', 0, output_dir=tmp_path / 'ours', amp=False,
                   progress=False)
    load_reference_weights(ours.network, ref.network.state_dict())
    train, val = ours.batch_streams()
    batches = [next(train) for _ in range(3)]
    val_batch = next(val)
    train.close(); val.close()
    ref.network.train(); ours.network.train()
    for b in batches:
        theirs = ref.train_step({'data': b['data'].clone(),
                                 'target': [t.clone() for t in b['target']]})['loss']
        mine = ours.train_step(b)
        np.testing.assert_allclose(mine.item(), theirs, rtol=1e-4, atol=1e-5)
    ref_weights = ref.network.state_dict()
    mine = {k: v for k, v in ours.network.state_dict().items()}
    from nnunet_lite.network import reference_key
    for k, v in mine.items():
        torch.testing.assert_close(v, ref_weights[reference_key(k)], rtol=1e-4, atol=1e-5)
    ref.network.eval(); ours.network.eval()
    r = ref.validation_step({'data': val_batch['data'].clone(),
                             'target': [t.clone() for t in val_batch['target']]})
    loss, counts = ours.validation_step(val_batch)
    np.testing.assert_allclose(loss.item(), r['loss'], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(counts.numpy(), np.stack([r['tp_hard'], r['fp_hard'], r['fn_hard']]))
