"""Glue for running the reference nnU-Net v2 (the `nnunetv2` package) from Python, for conformance tests.

This is a helper module, not a test module: it has no `test_` functions, so pytest does not collect it.
Import it from a test as `from reference_oracle import ...` (pytest puts `tests/` on `sys.path`).

What it provides:

- `reference_fingerprint(raw_dataset_dir)`: the reference's dataset fingerprint
  (`DatasetFingerprintExtractor`) of a raw dataset folder in nnU-Net v2 layout.
- `reference_plans(fingerprint, dataset_json)`: the reference experiment planner's plans
  (`ExperimentPlanner.plan_experiment()`) computed from a fingerprint alone, without any images.
- `make_fingerprint(spacings, shapes_after_crop, ...)`: a synthetic fingerprint in the reference's exact
  schema, plus a matching dataset.json, for feeding `reference_plans` (and our own planner).
- `reference_trainer(plans, configuration, dataset_json)`: the reference's `nnUNetTrainer` for a plans dict,
  on the CPU and not initialised, to read its hyperparameters, optimiser and deep-supervision weights.

How the reference finds its data. nnunetv2 locates everything through three folders named by the environment
variables `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results` (`nnunetv2/paths.py`), and addresses a
dataset by a folder name of the form `DatasetXXX_Name` inside them. In nnunetv2 2.8.x the module-level names
in `nnunetv2.paths` are lazy objects that read `os.environ` every time they are used, so setting the variables
is enough, even after import. Older releases read the variables once at import time and many modules copy them
with `from nnunetv2.paths import nnUNet_raw`; for those, `_reference_paths` also rewrites every such
module-level string in the loaded `nnunetv2.*` modules while a call runs, and restores them afterwards.

Every call builds its own throw-away `nnUNet_raw` / `nnUNet_preprocessed` / `nnUNet_results` under a fresh
temporary directory, which is removed afterwards, so repeated calls in one process are independent.
The reference's prints (reader/writer choice, planner configurations, tracebacks of readers it tries and
rejects) are swallowed; if it raises, what it printed is replayed on stderr before the error propagates.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pytest

__all__ = ["reference_fingerprint", "reference_plans", "reference_preprocess_case", "reference_trainer",
           "make_fingerprint", "DEFAULT_DATASET_NAME"]


REQUIRE_REFERENCE_VARIABLE = "NNLITE_REQUIRE_REFERENCE"


def require_reference():
    """The conformance oracle `nnunetv2`, for a test module to call before it uses the reference. Where the
    reference is not installed the module is skipped, except when NNLITE_REQUIRE_REFERENCE=1 (set by
    .ci/run): then a missing or broken install fails the run instead of silently turning the conformance
    suite into skips."""
    if os.environ.get(REQUIRE_REFERENCE_VARIABLE) == "1":
        try:
            import nnunetv2
        except Exception as e:
            raise RuntimeError(f"{REQUIRE_REFERENCE_VARIABLE}=1 but the conformance oracle nnunetv2 does not "
                               f"import: {type(e).__name__}: {e}") from e
        return nnunetv2
    return pytest.importorskip("nnunetv2",
                               reason="the conformance oracle nnunetv2 is installed with the dev extra")


_PATH_VARS = {"nnUNet_raw": "nnUNet_raw", "nnUNet_preprocessed": "nnUNet_preprocessed",
              "nnUNet_results": "nnUNet_results"}

DEFAULT_DATASET_NAME = "Dataset987_ReferenceOracle"
"Name under which datasets are exposed to the reference (it ends up in the plans as 'dataset_name')."

# file endings the reference reads as 2D natural images (NaturalImage2DIO) and as 3D tif stacks (Tiff3DIO)
_NATURAL_2D_ENDINGS = (".png", ".bmp")
_TIF_ENDINGS = (".tif", ".tiff")


# ------------------------------------------------------------------------------------------------------------
# plumbing: temporary nnU-Net folders, quiet execution, json
# ------------------------------------------------------------------------------------------------------------

def _loaded_nnunetv2_modules() -> list:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "nnunetv2" or n.startswith("nnunetv2."))]


@contextlib.contextmanager
def _reference_paths(root: Path) -> Iterator[dict[str, Path]]:
    """Point nnunetv2 at fresh `nnUNet_raw`, `nnUNet_preprocessed`, `nnUNet_results` folders under `root`.

    Sets the environment variables (which is all nnunetv2 >= 2.8 needs: its path objects read the environment
    lazily, and spawned worker processes inherit it) and, for older nnunetv2 releases that froze the paths
    into plain strings at import time, rewrites those strings in every loaded `nnunetv2.*` module. Everything
    is restored on exit. Yields {variable name: folder}.
    """
    folders = {var: root / sub for var, sub in _PATH_VARS.items()}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    saved_env = {var: os.environ.get(var) for var in folders}
    os.environ.update({var: str(f) for var, f in folders.items()})
    # imported only now, so that a first import of an old-style nnunetv2.paths sees the temporary folders
    import nnunetv2.paths as ref_paths
    originals = {var: getattr(ref_paths, var, None) for var in folders}
    frozen = {var: v is None or isinstance(v, str) for var, v in originals.items()}

    def patch():
        for mod in _loaded_nnunetv2_modules():
            for var, f in folders.items():
                if frozen[var] and var in vars(mod) and isinstance(vars(mod)[var], (str, type(None))):
                    setattr(mod, var, str(f))

    patch()
    try:
        yield folders
    finally:
        # modules imported inside the block may have copied the temporary strings too: undo them all
        for mod in _loaded_nnunetv2_modules():
            for var, f in folders.items():
                if frozen[var] and vars(mod).get(var, None) == str(f):
                    setattr(mod, var, originals[var])
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what the reference prints to sys.stdout / sys.stderr; replay it on stderr if it raises."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write("---- output of the reference nnunetv2 before the error ----\n" + buf.getvalue())
        raise


@contextlib.contextmanager
def _workspace(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _to_json_compatible(obj):
    "json.dump `default=` hook: numpy scalars and arrays to plain Python numbers and lists."
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_to_json_compatible))


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def _check_dataset_name(name: str) -> str:
    if not re.fullmatch(r"Dataset\d{3}_\w+", name):
        raise ValueError(f"dataset name must look like 'Dataset123_Name', got {name!r}")
    return name


# ------------------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------------------

def reference_fingerprint(raw_dataset_dir, num_processes: int = 1,
                          dataset_name: str = DEFAULT_DATASET_NAME) -> dict:
    """The dataset fingerprint the reference computes for the raw dataset at `raw_dataset_dir`.

    The folder must be in nnU-Net v2 raw layout (dataset.json, imagesTr/CASE_XXXX<ending>,
    labelsTr/CASE<ending>), but its name may be anything: it is symlinked into a temporary `nnUNet_raw` as
    `dataset_name` (`DatasetXXX_Name`, which the reference requires). `DatasetFingerprintExtractor(...).run()`
    then reads every training case (in a 'spawn' multiprocessing pool of `num_processes` workers, as the
    reference always does; a script calling this needs an `if __name__ == '__main__':` guard) and writes
    `nnUNet_preprocessed/<dataset_name>/dataset_fingerprint.json`.

    Returns the content of that json file, i.e. exactly what the reference's planner later reads: keys
    'spacings' and 'shapes_after_crop' (one (z, y, x) list per case, in the order of the sorted case
    identifiers), 'foreground_intensity_properties_per_channel' (keyed by channel index as a *string*, '0',
    '1', ...) and 'median_relative_size_after_cropping'. Nothing is written next to the input dataset.
    """
    raw = Path(raw_dataset_dir).resolve()
    if not (raw / "dataset.json").is_file():
        raise FileNotFoundError(f"{raw} has no dataset.json")
    name = _check_dataset_name(dataset_name)
    with _workspace("nnunet_ref_fp_") as root, _reference_paths(root) as folders:
        (folders["nnUNet_raw"] / name).symlink_to(raw, target_is_directory=True)
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
            DatasetFingerprintExtractor
        with _quiet():
            extractor = DatasetFingerprintExtractor(name, num_processes=num_processes, verbose=False)
            extractor.show_progress_bar = False
            extractor.run(overwrite_existing=True)
        return _read_json(folders["nnUNet_preprocessed"] / name / "dataset_fingerprint.json")


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------

def _looks_2d(fingerprint: Mapping) -> bool:
    "True if every case is a single slice (how the reference stores 2D images: shape (1, H, W))."
    return all(int(s[0]) == 1 for s in fingerprint["shapes_after_crop"])


def _write_dummy_image(path_without_ending: Path, file_ending: str, two_d: bool) -> Path:
    """Write a tiny image that the reference reader for `file_ending` can open; return its path.

    The planner reads exactly one training image, and only to choose the image reader/writer class
    (plans['image_reader_writer']) by trying the readers registered for the file ending in order. The content
    is irrelevant; only the format has to match what a real dataset of this ending would be read with.
    """
    import SimpleITK as sitk

    path = path_without_ending.parent / (path_without_ending.name + file_ending)
    ending = file_ending.lower()
    if ending in _NATURAL_2D_ENDINGS or (ending in _TIF_ENDINGS and two_d):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(path))
    elif ending in _TIF_ENDINGS:
        import tifffile  # a 3D stack; its shape keeps the 2D reader from taking it for an RGB(A) image
        tifffile.imwrite(str(path), np.zeros((2, 5, 6), np.float32))
        _write_json({"spacing": [1.0, 1.0, 1.0]}, path.parent / (path_without_ending.name[:-5] + ".json"))
    else:  # .nii.gz, .nii, .nrrd, .mha, .gipl, ...: SimpleITK writes them all
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 5, 6), np.float32)), str(path))
    return path


def _find_planner_class(planner):
    "A planner class, given as a class or by name (searched for in nnunetv2.experiment_planning, as the CLI)."
    if not isinstance(planner, str):
        return planner
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), planner,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise ValueError(f"no experiment planner class named {planner!r} in nnunetv2.experiment_planning")
    return cls


def reference_plans(fingerprint: Mapping, dataset_json: Mapping, gpu_memory_gb: float | None = 8,
                    planner="ExperimentPlanner", dataset_name: str = DEFAULT_DATASET_NAME) -> dict:
    """The plans (the content of nnUNetPlans.json) the reference's planner makes from a fingerprint alone.

    `fingerprint` is a dict in the schema of dataset_fingerprint.json (from `reference_fingerprint`,
    `make_fingerprint` or our own code); `dataset_json` the dataset.json dict. `planner` is a planner class or
    its class name (e.g. 'ExperimentPlanner', 'nnUNetPlannerResEncM'); `gpu_memory_gb` is passed as
    `gpu_memory_target_in_gb` (None keeps the planner's own default, which the ResEnc L/XL planners change).

    What the reference needs besides the fingerprint, all laid out in a temporary tree:
    - `nnUNet_preprocessed/<name>/dataset_fingerprint.json`: the fingerprint (the constructor needs it);
    - `nnUNet_raw/<name>/dataset.json`: it uses 'channel_names' (number of input channels and the
      normalization scheme per channel), 'labels' (number of network outputs), 'numTraining' (dataset size,
      which caps the batch size at 5% of the dataset's voxels) and 'file_ending';
    - one readable training image `nnUNet_raw/<name>/imagesTr/<case>_0000<file_ending>`: the constructor lists
      imagesTr, and `plan_experiment` opens the first image only to pick 'image_reader_writer'. A tiny dummy
      of the right format is written; nothing else in the plans depends on it. If `dataset_json` lists its
      files explicitly (a 'dataset' key), that list is replaced by the dummy.
    `plan_experiment()` is then called; it also builds candidate networks on the CPU to estimate VRAM use.
    Returns the plans as read back from the json file the planner writes (tuples become lists, etc.).
    """
    name = _check_dataset_name(dataset_name)
    dataset_json = dict(dataset_json)
    file_ending = dataset_json["file_ending"]
    with _workspace("nnunet_ref_plan_") as root, _reference_paths(root) as folders:
        raw = folders["nnUNet_raw"] / name
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        dummy = _write_dummy_image(raw / "imagesTr" / "oracle_dummy_0000", file_ending,
                                   _looks_2d(fingerprint))
        if "dataset" in dataset_json:
            label = raw / "labelsTr" / ("oracle_dummy" + file_ending)
            dataset_json["dataset"] = {"oracle_dummy": {"images": [str(dummy)], "label": str(label)}}
        _write_json(dataset_json, raw / "dataset.json")
        _write_json(fingerprint, folders["nnUNet_preprocessed"] / name / "dataset_fingerprint.json")

        cls = _find_planner_class(planner)
        kwargs = {} if gpu_memory_gb is None else {"gpu_memory_target_in_gb": gpu_memory_gb}
        with _quiet():
            experiment_planner = cls(name, **kwargs)
            experiment_planner.plan_experiment()
        plans_file = experiment_planner.plans_identifier + ".json"
        return _read_json(folders["nnUNet_preprocessed"] / name / plans_file)


def reference_preprocess_case(image_files, label_file, plans: Mapping, configuration: str,
                              dataset_json: Mapping):
    """One case through the reference's `DefaultPreprocessor.run_case`: (data, seg, properties), as returned.

    `plans` is a plans dict in v2's schema (ours or the reference's), `dataset_json` the dataset.json dict;
    the files are read with the plans' `image_reader_writer`. No nnU-Net folders: run_case works on files.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(json.loads(json.dumps(plans)))
    with _quiet():
        return DefaultPreprocessor(verbose=False).run_case(
            [str(f) for f in image_files], None if label_file is None else str(label_file), plans_manager,
            plans_manager.get_configuration(configuration), json.loads(json.dumps(dataset_json)))


# ------------------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------------------

def reference_trainer(plans: Mapping, configuration: str, dataset_json: Mapping, fold: int = 0):
    """The reference's `nnUNetTrainer` for `plans`, on the CPU and not initialised (no network, no data), to
    read what it sets up: its hyperparameters (`initial_lr`, `weight_decay`, `num_epochs`, ...),
    `_build_loss()` (the deep-supervision weights), `configure_optimizers()` once it is given a `network`.

    The constructor makes its output folder under `nnUNet_results`: that lives in a temporary workspace,
    removed before this returns, and the trainer's log file is switched off (`print_to_log_file` does
    nothing), so nothing it does afterwards writes there. `plans` and `dataset_json` are copied (the
    constructor pops a key of `plans`).
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    plans = {**json.loads(json.dumps(plans)), "continue_training": False}
    with _workspace("nnunet_ref_trainer_") as root, _reference_paths(root), _quiet():
        trainer = nnUNetTrainer(plans, configuration, fold, json.loads(json.dumps(dataset_json)),
                                device=torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    return trainer


# ------------------------------------------------------------------------------------------------------------
# synthetic fingerprints
# ------------------------------------------------------------------------------------------------------------

_INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
_DEFAULT_INTENSITY = {"mean": 100.0, "median": 90.0, "std": 60.0, "min": -200.0, "max": 1200.0,
                      "percentile_99_5": 400.0, "percentile_00_5": -50.0}


def _per_case(values, n: int | None, what: str) -> list[list]:
    "A list of per-case triples; a single triple (a flat sequence of numbers) is repeated for n cases."
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        if n is None:
            raise ValueError(f"{what}: a single triple needs the number of cases (give the other per case)")
        values = np.repeat(values[None], n, 0)
    if values.ndim != 2:
        raise ValueError(f"{what} must be one (z, y, x) triple or a list of them, got shape {values.shape}")
    return values.tolist()


def make_fingerprint(spacings, shapes_after_crop, channel_names: Sequence[str] = ("CT",),
                     median_relative_size_after_cropping: float = 1.0, intensity=None,
                     num_cases: int | None = None, file_ending: str = ".nii.gz") -> tuple[dict, dict]:
    """A synthetic dataset fingerprint in the reference's exact schema, and a matching dataset.json dict.

    `spacings` and `shapes_after_crop` are per case, in (z, y, x) order as the reference stores them; either
    may also be a single triple, repeated for every case (the number of cases then comes from the other
    argument, or from `num_cases` if both are single triples). A 2D dataset is represented as the reference
    does it: shape (1, H, W), spacing (999, sy, sx).

    `intensity` gives 'foreground_intensity_properties_per_channel': None (a made-up, plausible set of
    statistics for every channel), one dict for all channels, or a list of dicts, one per channel; each dict
    has the keys mean, median, std, min, max, percentile_99_5, percentile_00_5 (missing keys take the made-up
    values). The planner only copies these into the plans; CT normalization uses them in preprocessing.

    The fingerprint is what json.load gives for a reference dataset_fingerprint.json: channel keys are strings
    ('0', '1', ...), spacings floats, shapes ints. The dataset.json has channel_names {'0': name, ...}, labels
    {'background': 0, 'class1': 1, 'class2': 2}, numTraining = number of cases, and `file_ending`.
    """
    spacings_arr = np.asarray(spacings, dtype=np.float64)
    shapes_arr = np.asarray(shapes_after_crop, dtype=np.float64)
    n = num_cases
    if n is None and spacings_arr.ndim == 2:
        n = len(spacings_arr)
    if n is None and shapes_arr.ndim == 2:
        n = len(shapes_arr)
    sp = _per_case(spacings_arr, n, "spacings")
    sh = _per_case(shapes_arr, n, "shapes_after_crop")
    if len(sp) != len(sh) or (num_cases is not None and len(sp) != num_cases):
        raise ValueError(f"inconsistent numbers of cases: {len(sp)} spacings, {len(sh)} shapes, "
                         f"num_cases={num_cases}")
    if any(len(s) != 3 for s in sp + sh):
        raise ValueError("spacings and shapes must be (z, y, x) triples (2D: (999, y, x) and (1, y, x))")

    channel_names = list(channel_names)
    if intensity is None or isinstance(intensity, Mapping):
        intensity = [intensity or {}] * len(channel_names)
    if len(intensity) != len(channel_names):
        raise ValueError(f"{len(intensity)} intensity dicts for {len(channel_names)} channels")
    unknown = {k for d in intensity for k in d} - set(_INTENSITY_KEYS)
    if unknown:
        raise ValueError(f"unknown intensity keys {sorted(unknown)}; expected {_INTENSITY_KEYS}")

    fingerprint = {
        "spacings": [[float(v) for v in s] for s in sp],
        "shapes_after_crop": [[int(round(v)) for v in s] for s in sh],
        "foreground_intensity_properties_per_channel": {
            str(i): {k: float(d.get(k, _DEFAULT_INTENSITY[k])) for k in _INTENSITY_KEYS}
            for i, d in enumerate(intensity)},
        "median_relative_size_after_cropping": float(median_relative_size_after_cropping),
    }
    dataset_json = {
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": {"background": 0, "class1": 1, "class2": 2},
        "numTraining": len(sp),
        "file_ending": file_ending,
        "name": "synthetic_fingerprint",
    }
    return fingerprint, dataset_json
