"""Shared fixtures: small synthetic datasets written once per test session."""
import os
import shutil

import matplotlib
import pytest

matplotlib.use("Agg")
# nnunetv2 prints warnings when its path variables are unset; give it harmless ones
for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(var, "/tmp/nnunet_lite_unused")

from nnunet_lite.data import make_synthetic_dataset  # noqa: E402

# Under pytest-xdist (`-n 2`) the workers share the cores: each gets its share of torch threads instead of all
# of them, and so do the `nnlite` processes its tests start (OMP_NUM_THREADS, inherited). Oversubscribed,
# OpenMP's spinning threads made two CLI tests running side by side 4-5x slower than alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch
    share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

SMALL = {
    "ct": dict(shape=(12, 20, 20)),
    "mr": dict(shape=(12, 20, 20)),
    "ct_aniso": dict(shape=(6, 24, 24)),
    "mr_aniso": dict(shape=(6, 24, 24)),
    "ct2d": dict(shape=(32, 32)),
    "mr2d": dict(shape=(32, 32)),
}


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    "One small synthetic dataset per kind: {kind: path}."
    root = tmp_path_factory.mktemp("synthetic")
    return {kind: make_synthetic_dataset(root / kind, kind, n_train=3, n_test=1, progress=False, **kw)
            for kind, kw in SMALL.items()}


@pytest.fixture
def dataset_copy(datasets, tmp_path):
    "A writable copy of a session dataset: dataset_copy('mr') -> path."
    def copy(kind="mr"):
        dst = tmp_path / f"copy_{kind}"
        shutil.copytree(datasets[kind], dst)
        return dst
    return copy
