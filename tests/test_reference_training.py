"""Loss, deep-supervision weights, learning rate and folds against nnU-Net v2's own classes and functions."""
import numpy as np
import pytest
import torch

from nnunet_lite.training import (crossval_splits, deep_supervision_loss, deep_supervision_weights, dice_ce_loss,
                                  make_optimizer, poly_lr, pseudo_dice, region_dice_bce_loss, set_lr, tp_fp_fn)

pytest.importorskip("nnunetv2")
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler  # noqa: E402
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402


def reference_ce_dice(batch_dice, ignore_label=None):
    return DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


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
                               torch.as_tensor(reference_ce_dice(batch_dice, 3)(logits, all_ignored), dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("has_ignore", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_loss_equals_reference(has_ignore, batch_dice):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 6, 7, generator=g)
    target = torch.rand(2, 3 + has_ignore, 5, 6, 7, generator=g) > 0.6
    ref = DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': 1e-5, 'ddp': False},
                          use_ignore_label=has_ignore, dice_class=MemoryEfficientSoftDiceLoss)
    torch.testing.assert_close(region_dice_bce_loss(logits, target, batch_dice, has_ignore), ref(logits, target),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_deep_supervision_equals_reference(n):
    weights = np.array([1 / (2 ** i) for i in range(n)]); weights[-1] = 0; weights = weights / weights.sum()
    np.testing.assert_allclose(deep_supervision_weights(n), weights)
    g = torch.Generator().manual_seed(n)
    outputs = [torch.randn(2, 3, 16 // 2 ** i, 16 // 2 ** i, generator=g) for i in range(n)]
    targets = [torch.randint(0, 3, (2, 1, 16 // 2 ** i, 16 // 2 ** i), generator=g) for i in range(n)]
    ref = DeepSupervisionWrapper(reference_ce_dice(True), weights)(outputs, targets)
    torch.testing.assert_close(deep_supervision_loss(outputs, targets, lambda o, t: dice_ce_loss(o, t, True)), ref,
                               rtol=1e-5, atol=1e-6)


def test_poly_lr_and_optimizer_equal_reference():
    net = torch.nn.Linear(3, 2)
    ours = make_optimizer(net.parameters())
    theirs = torch.optim.SGD(net.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    for key in ('lr', 'momentum', 'weight_decay', 'nesterov', 'dampening'):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key]
    scheduler = PolyLRScheduler(theirs, 0.01, 40)
    for epoch in range(40):
        scheduler.step(epoch); set_lr(ours, poly_lr(epoch, 40))
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
    np.testing.assert_array_equal(tp.numpy(), rtp[1:].numpy()); np.testing.assert_array_equal(fp.numpy(), rfp[1:].numpy())
    np.testing.assert_array_equal(fn.numpy(), rfn[1:].numpy())
    r = rtp[1:].numpy(); expected = 2 * r / (2 * r + rfp[1:].numpy() + rfn[1:].numpy())
    np.testing.assert_allclose(pseudo_dice(tp, fp, fn), expected)
