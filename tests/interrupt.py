"""A trainer interrupted on purpose, for the tests that kill a run and resume it."""


def interrupt_at(trainer, epoch=None):
    "Make `trainer` raise KeyboardInterrupt once `epoch` epochs are done, as Ctrl-C then would (None: never)."
    if epoch is None: return trainer
    plain_after_epoch = trainer.after_epoch
    def after_epoch(row):
        plain_after_epoch(row)
        if trainer.epoch == epoch: raise KeyboardInterrupt
    trainer.after_epoch = after_epoch
    return trainer
