"""Preprocessing speed: nnunet_lite against the reference nnU-Net v2, on the same synthetic dataset and plans.

What it measures
----------------
1. Writes a synthetic raw dataset (`nnunet_lite.data.make_synthetic_dataset`, with spacing jitter so that every
   case is really resampled), computes its fingerprint and plans with nnunet_lite, and hands the *same* plans
   (nnU-Net v2 schema) to both tools.
2. Preprocesses the whole dataset for one configuration with each tool, with the same number of worker
   processes (both use 'spawn' pools, so both pay for starting workers and importing torch in them):
   - reference: `DefaultPreprocessor(verbose=False).run(dataset, configuration, 'nnUNetPlans', workers)`,
     which writes blosc2-compressed arrays (+ a pickle) per case;
   - ours: `nnunet_lite.preprocessing.preprocess_dataset(..., workers=workers)`, which writes plain .npy files.
   Runs alternate ABBA (reference, ours, ours, reference; `--rounds` repeats it), so neither tool always goes first
   or last; before them both packages are imported once (untimed, also in a spawned process) so that the first run
   does not pay for reading them from disk. Each run starts from an empty output folder.
3. Checks that the outputs agree on the first `--check-cases` cases: image max |difference|, label voxels that
   differ, and whether the stored foreground locations are identical.
4. Profiles ONE case stage by stage in this process (single-threaded, after a warm-up on another case, our
   interpolation-matrix cache cleared so nothing is reused that a real run could not reuse): the reference's
   own functions called in the order `run_case_npy`/`run_case_save` call them, and ours in the order
   `preprocess_arrays`/`save_case` do.

How to read it
--------------
- `wall s` is the wall time of a whole dataset run; `worker CPU s` the CPU seconds its worker processes used
  (less sensitive to other load on the machine). `ratio` = reference / ours: > 1 means ours is faster.
  The mean over the runs is the headline number; the best run of each tool is shown too.
- `agreement`: image differences around 1e-6 are float32 rounding (we compute in float32/float64 with torch, the
  reference in float64 with scipy/skimage); label mismatches should be 0.
- The per-stage table shows where each tool spends one case's time; the columns sum to about that case's time.
  The save stage is not like for like: the reference compresses (blosc2 LZ4HC, after trial-compressing with two
  filters), we write uncompressed .npy.
- The dataset runs include process start-up (spawn + imports, ~1-2 s per worker), which the per-case profile
  does not. With few small cases start-up dominates; raise `--cases`/`--shape` for steadier numbers.
- The first line says how many CPUs other processes kept busy just before the start: timings taken while something
  else runs are noisy (the worker CPU seconds less so than the wall times).

Run from the repository root: `python bench/preprocess.py [--kind ct_aniso] [--cases 8] [-np 2]`.
"""
# Only the standard library at module level: the worker processes of both tools are started with 'spawn' and
# re-import this file, and neither should pay for the other's imports.
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DATASET_NAME = 'Dataset987_Bench'
KINDS = ('ct', 'mr', 'ct_aniso', 'mr_aniso', 'ct2d', 'mr2d')
# per kind: shape (z, y, x) or (y, x) of one case before jitter; big enough that the work, not process start-up,
# dominates, small enough that the default run takes a few minutes on a 2-core machine
DEFAULT_SHAPES = {'ct': (96, 160, 160), 'mr': (80, 160, 160), 'ct_aniso': (40, 256, 256),
                  'mr_aniso': (40, 224, 224), 'ct2d': (512, 512), 'mr2d': (512, 512)}
STAGES = ('read', 'transpose+crop', 'normalise', 'resample image', 'resample label', 'sample locations', 'save')


# ------------------------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kind', default='ct', choices=KINDS, help='synthetic dataset kind (default ct)')
    p.add_argument('--cases', type=int, default=8, help='training cases (default 8)')
    p.add_argument('--shape', default=None,
                   help='shape of one case before jitter, e.g. 96,160,160 (2D kinds: 512,512); default per kind: '
                        + ', '.join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_SHAPES.items()))
    p.add_argument('--spacing-jitter', type=float, default=0.2,
                   help='per-case spacing scaled by U(1-j, 1+j), so cases really get resampled (default 0.2)')
    p.add_argument('-np', '--workers', type=int, default=2, help='worker processes, for both tools (default 2)')
    p.add_argument('--configuration', default=None,
                   help="plans configuration (default 3d_fullres; '2d' for the 2D kinds)")
    p.add_argument('--rounds', type=int, default=1,
                   help='ABBA rounds: each round runs reference, ours, ours, reference (default 1)')
    p.add_argument('--check-cases', type=int, default=2, help='cases compared for agreement (default 2)')
    p.add_argument('--profile-repeats', type=int, default=3,
                   help='repeats of the one-case stage profile; the median per stage is shown (default 3)')
    p.add_argument('--cprofile', type=int, default=0, metavar='N',
                   help='also cProfile our pipeline on the profiled case and print the top N functions')
    p.add_argument('--out', default=None, help='working folder, kept afterwards (default: a temporary folder, removed afterwards unless --keep)')
    p.add_argument('--keep', action='store_true', help='keep the temporary working folder')
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(',')) if a.shape else DEFAULT_SHAPES[a.kind]
    if len(shape) != len(DEFAULT_SHAPES[a.kind]):
        p.error(f"--shape for kind {a.kind} needs {len(DEFAULT_SHAPES[a.kind])} numbers, got {a.shape!r}")
    a.shape = shape
    a.is_2d = len(shape) == 2
    if a.configuration is None: a.configuration = '2d' if a.is_2d else '3d_fullres'
    if a.cases < 2: p.error('--cases must be at least 2 (one case warms up the stage profile of another)')
    if a.workers < 1 or a.rounds < 1: p.error('--workers and --rounds must be at least 1')
    return a


def set_reference_paths(root: Path) -> dict:
    "Point nnunetv2 (2.8.x reads these lazily; spawned workers inherit them) at folders under `root`."
    folders = {v: root / v for v in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for var, f in folders.items():
        f.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(f)
    return folders


def build_dataset(args, folders: dict):
    "Synthetic raw dataset in nnUNet_raw/Dataset987_Bench, our fingerprint and plans, and the reference's copies."
    from nnunet_lite.data import make_synthetic_dataset, read_dataset_json
    from nnunet_lite.fingerprint import extract_fingerprint
    from nnunet_lite.plans import plan_experiment, save_plans
    raw = folders['nnUNet_raw'] / DATASET_NAME
    t0 = time.perf_counter()
    make_synthetic_dataset(raw, args.kind, workers=args.workers, progress=False, n_train=args.cases, n_test=0,
                           shape=args.shape, spacing_jitter=args.spacing_jitter)
    t1 = time.perf_counter()
    dataset_json = read_dataset_json(raw)
    fingerprint = extract_fingerprint(raw, workers=args.workers, progress=False)
    plans = plan_experiment(fingerprint, dataset_json, dataset_name=DATASET_NAME)
    plans['dataset_name'] = DATASET_NAME
    if args.configuration not in plans['configurations']:
        sys.exit(f"configuration {args.configuration!r} is not in the plans (they have {list(plans['configurations'])})")
    pre = folders['nnUNet_preprocessed'] / DATASET_NAME
    pre.mkdir(parents=True, exist_ok=True)
    save_plans(plans, pre / 'nnUNetPlans.json')
    shutil.copy(raw / 'dataset.json', pre / 'dataset.json')
    print(f"dataset: {args.cases} {args.kind} cases, shape ~{'x'.join(map(str, args.shape))} "
          f"(spacing jitter {args.spacing_jitter}) written in {t1 - t0:.1f} s; fingerprint+plans {time.perf_counter() - t1:.1f} s")
    return raw, dataset_json, plans


# ------------------------------------------------------------------------------------------------------------------
# whole-dataset runs
# ------------------------------------------------------------------------------------------------------------------

def busy_cpus(seconds: float = 1.0) -> float | None:
    "How many CPUs something else keeps busy right now (from /proc/stat over `seconds`), None where unknown."
    def sample():
        with open('/proc/stat') as f: v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]                       # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_reference(args, folders: dict) -> Path:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    pp = DefaultPreprocessor(verbose=False)
    pp.show_progress_bar = False
    pp.run(DATASET_NAME, args.configuration, 'nnUNetPlans', args.workers)   # removes its output folder first
    plans = json.loads((folders['nnUNet_preprocessed'] / DATASET_NAME / 'nnUNetPlans.json').read_text())
    return folders['nnUNet_preprocessed'] / DATASET_NAME / plans['configurations'][args.configuration]['data_identifier']


def run_ours(args, raw: Path, plans: dict, out: Path) -> Path:
    from nnunet_lite.preprocessing import preprocess_dataset
    if out.exists(): shutil.rmtree(out)
    return preprocess_dataset(raw, plans, args.configuration, out, workers=args.workers, progress=False)


def _import_both():
    import nnunet_lite.preprocessing  # noqa: F401
    import nnunetv2.preprocessing.preprocessors.default_preprocessor  # noqa: F401


def warm_imports():
    "Import both tools here and once in a spawned process (untimed), so the first timed run is not the one that reads them from disk."
    import multiprocessing
    _import_both()
    p = multiprocessing.get_context('spawn').Process(target=_import_both)
    p.start(); p.join()


def timed(fn, *a):
    cpu0, t0 = _children_cpu(), time.perf_counter()
    result = fn(*a)
    return result, time.perf_counter() - t0, _children_cpu() - cpu0


def dataset_runs(args, folders, raw, plans, root):
    "ABBA-ordered runs of both tools: ({tool: [(wall, cpu), ...]}, the output folders)."
    order = ['reference', 'ours', 'ours', 'reference'] * args.rounds
    warm_imports()
    times, outs, log = {'reference': [], 'ours': []}, {}, []
    for i, tool in enumerate(order):
        if tool == 'reference': out, wall, cpu = timed(run_reference, args, folders)
        else: out, wall, cpu = timed(run_ours, args, raw, plans, root / 'ours_preprocessed')
        times[tool].append((wall, cpu)); outs[tool] = out
        log.append(f"run {i + 1}: {tool:9s} {wall:7.2f} s wall, {cpu:7.2f} s worker CPU")
    print('\n'.join(log))
    return times, outs


def print_times(args, times: dict):
    n = args.cases
    rows = []
    for tool in ('reference', 'ours'):
        walls, cpus = [t[0] for t in times[tool]], [t[1] for t in times[tool]]
        rows.append((tool, statistics.mean(walls), min(walls), statistics.mean(walls) / n, statistics.mean(cpus)))
    print(f"\n{'tool':10s} {'wall s (mean)':>13s} {'wall s (best)':>13s} {'s / case':>9s} {'worker CPU s':>12s}")
    for tool, mean, best, per_case, cpu in rows:
        print(f"{tool:10s} {mean:13.2f} {best:13.2f} {per_case:9.3f} {cpu:12.2f}")
    (_, ref_mean, ref_best, _, ref_cpu), (_, our_mean, our_best, _, our_cpu) = rows
    print(f"ratio (reference / ours): wall mean {ref_mean / our_mean:.2f}x, wall best {ref_best / our_best:.2f}x, "
          f"worker CPU {ref_cpu / max(our_cpu, 1e-9):.2f}x   ({args.workers} workers each)")
    return ref_mean / our_mean


# ------------------------------------------------------------------------------------------------------------------
# agreement
# ------------------------------------------------------------------------------------------------------------------

def _same_locations(ref: dict, ours: dict) -> bool:
    import numpy as np
    key = lambda k: tuple(k) if isinstance(k, (list, tuple)) else int(k)
    # the reference stores (n, 4) positions in the (1, z, y, x) label (leading 0), we store (n, 3)
    ref = {key(k): np.asarray(v).reshape(len(v), -1)[:, -3:] for k, v in ref.items()}
    ours = {key(k): np.asarray(v).reshape(len(v), -1)[:, -3:] for k, v in ours.items()}
    return ref.keys() == ours.keys() and all(np.array_equal(ref[k], ours[k]) for k in ref)


def check_agreement(args, ref_folder: Path, our_folder: Path):
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunet_lite.preprocessing import load_preprocessed_case, preprocessed_cases
    cases = preprocessed_cases(our_folder)[:args.check_cases]
    ref = nnUNetDatasetBlosc2(str(ref_folder), identifiers=cases)
    print(f"\nagreement ({len(cases)} cases):")
    ok = True
    for case in cases:
        rd, rs, _, rp = ref.load_case(case)
        rd, rs = np.asarray(rd[:]), np.asarray(rs[:])
        od, os_, op = load_preprocessed_case(our_folder, case, mmap=False)
        if rd.shape != od.shape or rs.shape != os_.shape:
            print(f"  {case}: SHAPES DIFFER: reference image {rd.shape} label {rs.shape}, ours {od.shape} {os_.shape}")
            ok = False; continue
        diff = float(np.abs(rd.astype(np.float64) - od).max()) if rd.size else 0.0
        mismatches = int((rs.astype(np.int32) != os_.astype(np.int32)).sum())
        locations = _same_locations(rp.get('class_locations', {}), op.get('class_locations', {}))
        ok &= diff < 1e-3 and mismatches == 0
        print(f"  {case}: shape {tuple(od.shape)}  image max |diff| {diff:.3g}  label mismatches {mismatches} "
              f"of {rs.size}  foreground locations {'identical' if locations else 'DIFFER'}")
    return ok


# ------------------------------------------------------------------------------------------------------------------
# one case, stage by stage
# ------------------------------------------------------------------------------------------------------------------

class Stopwatch:
    def __init__(self): self.t, self.last = {}, time.perf_counter()
    def lap(self, stage):
        now = time.perf_counter()
        self.t[stage] = self.t.get(stage, 0.0) + now - self.last
        self.last = now


def reference_stages(case, files, label, plans, configuration, dataset_json, out: Path) -> dict:
    "`DefaultPreprocessor.run_case_save` of one case, its steps timed separately (same calls, same order)."
    import numpy as np
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pp = DefaultPreprocessor(verbose=False)
    pm = PlansManager(json.loads(json.dumps(plans)))
    cm = pm.get_configuration(configuration)
    for suffix in ('.b2nd', '_seg.b2nd', '.pkl'):   # blosc2 does not overwrite (the reference's run() empties its folder)
        (out / f'{case}{suffix}').unlink(missing_ok=True)
    sw = Stopwatch()
    rw = pm.image_reader_writer_class()
    data, properties = rw.read_images([str(f) for f in files])
    seg, _ = rw.read_seg(str(label))
    sw.lap('read')
    data = data.astype(np.float32)
    seg = np.copy(seg)
    data = data.transpose([0, *[i + 1 for i in pm.transpose_forward]])
    seg = seg.transpose([0, *[i + 1 for i in pm.transpose_forward]])
    original_spacing = [properties['spacing'][i] for i in pm.transpose_forward]
    properties['shape_before_cropping'] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data, seg)
    properties['bbox_used_for_cropping'] = bbox
    properties['shape_after_cropping_and_before_resampling'] = data.shape[1:]
    target_spacing = cm.spacing
    if len(target_spacing) < len(data.shape[1:]): target_spacing = [original_spacing[0]] + target_spacing
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
    sw.lap('transpose+crop')
    data = pp._normalize(data, seg, cm, pm.foreground_intensity_properties_per_channel)
    sw.lap('normalise')
    data = cm.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
    sw.lap('resample image')
    seg = cm.resampling_fn_seg(seg, new_shape, original_spacing, target_spacing)
    sw.lap('resample label')
    label_manager = pm.get_label_manager(dataset_json)
    collect = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    if label_manager.has_ignore_label: collect.append([-1] + label_manager.all_labels)
    properties['class_locations'] = pp._sample_foreground_locations(seg, collect, verbose=False)
    seg = pp.modify_seg_fn(seg, pm, dataset_json, cm)
    seg = seg.astype(np.int16) if np.max(seg) > 127 else seg.astype(np.int8)
    sw.lap('sample locations')
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    block_data, chunk_data = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    block_seg, chunk_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    out.mkdir(parents=True, exist_ok=True)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, str(out / case), chunks=chunk_data, blocks=block_data,
                                  chunks_seg=chunk_seg, blocks_seg=block_seg)
    sw.lap('save')
    return sw.t


def our_stages(case, files, label, plans, configuration, dataset_json, out: Path) -> dict:
    "`preprocess_case` + `save_case` of one case, its steps timed separately (same calls, same order)."
    import numpy as np
    from nnunet_lite.fingerprint import crop_to_nonzero
    from nnunet_lite.preprocessing import (new_shape_for, normalize, read_case, resample_image, resample_label,
                                           sample_class_locations, sampling_classes, save_case, target_spacing_for,
                                           transpose_case)
    from nnunet_lite.plans import Configuration
    cfg = Configuration.from_plans(plans, configuration, dataset_json)
    sw = Stopwatch()
    image, lab, geometry = read_case(files, label)
    sw.lap('read')
    image, lab, spacing = transpose_case(np.array(image, np.float32), lab, geometry.spacing, plans['transpose_forward'])
    shape_before = list(image.shape[1:])
    image, seg, box = crop_to_nonzero(image, lab)
    target = target_spacing_for(cfg, spacing)
    new_shape = new_shape_for(image.shape[1:], spacing, target)
    shape_after_crop = list(image.shape[1:])
    sw.lap('transpose+crop')
    image = normalize(image, seg, cfg.normalization_schemes, cfg.use_mask_for_norm, cfg.intensity_properties)
    sw.lap('normalise')
    image = resample_image(image, new_shape, spacing, target, **cfg.resampling['data'])
    sw.lap('resample image')
    seg = resample_label(seg, new_shape, spacing, target, **cfg.resampling['seg'])
    sw.lap('resample label')
    props = {'geometry': geometry.to_dict(), 'configuration': configuration,
             'transpose_forward': list(plans['transpose_forward']), 'transpose_backward': list(plans['transpose_backward']),
             'shape_before_cropping': shape_before, 'bbox_used_for_cropping': box,
             'shape_after_cropping_and_before_resampling': shape_after_crop, 'shape_after_resampling': list(new_shape),
             'spacing_before_resampling': spacing, 'spacing_after_resampling': target}
    props['class_locations'] = sample_class_locations(seg, sampling_classes(dataset_json))
    seg = seg.astype(np.int16 if seg.size and seg.max() > 127 else np.int8)[None]
    sw.lap('sample locations')
    save_case(out, case, image, seg, props)
    sw.lap('save')
    return sw.t


def stage_profile(args, raw: Path, dataset_json: dict, plans: dict, root: Path):
    import torch
    from nnunet_lite.data import training_cases
    from nnunet_lite.preprocessing import interpolation_matrix
    torch.set_num_threads(1)          # as in the workers of preprocess_dataset (and the reference is single-threaded)
    cases = training_cases(raw, dataset_json)
    (warm_id, warm), (case_id, case) = list(cases.items())[1], list(cases.items())[0]
    tools = {'reference': reference_stages, 'ours': our_stages}
    results = {t: [] for t in tools}
    for tool, fn in tools.items():      # warm-up on another case: imports, lazy initialisations
        fn(warm_id, warm['images'], warm['label'], plans, args.configuration, dataset_json, root / f'profile_{tool}')
    for _ in range(args.profile_repeats):
        for tool, fn in tools.items():
            interpolation_matrix.cache_clear()   # a real run meets new shapes in every case
            results[tool].append(fn(case_id, case['images'], case['label'], plans, args.configuration, dataset_json,
                                    root / f'profile_{tool}'))
    med = {t: {s: statistics.median(r[s] for r in results[t]) for s in STAGES} for t in tools}
    print(f"\none case ({case_id}), seconds per stage (median of {args.profile_repeats}, 1 thread):")
    print(f"{'stage':18s} {'reference':>10s} {'ours':>10s} {'ratio':>7s}")
    for s in STAGES:
        r, o = med['reference'][s], med['ours'][s]
        print(f"{s:18s} {r:10.3f} {o:10.3f} {r / o if o > 0 else float('inf'):6.1f}x")
    r, o = sum(med['reference'].values()), sum(med['ours'].values())
    print(f"{'total':18s} {r:10.3f} {o:10.3f} {r / o:6.1f}x")
    if args.cprofile:
        import cProfile
        import pstats
        interpolation_matrix.cache_clear()
        prof = cProfile.Profile()
        prof.runcall(our_stages, case_id, case['images'], case['label'], plans, args.configuration, dataset_json,
                     root / 'profile_ours')
        print(f"\ncProfile of our pipeline on {case_id} (top {args.cprofile} by cumulative time):")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats('cumulative').print_stats(args.cprofile)


# ------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    temporary = args.out is None
    root = Path(tempfile.mkdtemp(prefix='nnlite_bench_pp_')) if temporary else Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    busy = busy_cpus()
    print(f"bench/preprocess.py: kind {args.kind}, configuration {args.configuration}, {args.workers} workers, "
          f"{os.cpu_count()} CPUs" + ('' if busy is None else f", {busy:.1f} CPUs busy with other work before the start")
          + ('  (timings will be noisy)' if busy and busy > 0.3 else ''))
    try:
        folders = set_reference_paths(root)
        raw, dataset_json, plans = build_dataset(args, folders)
        times, outs = dataset_runs(args, folders, raw, plans, root)
        print_times(args, times)
        ok = check_agreement(args, outs['reference'], outs['ours'])
        stage_profile(args, raw, dataset_json, plans, root)
        if not ok: print('\nWARNING: the outputs differ (see agreement above)')
    finally:
        if temporary and not args.keep: shutil.rmtree(root, ignore_errors=True)
        else: print(f"\nworking folder kept: {root}")


if __name__ == '__main__':
    main()
