"""The nnlite command as a user runs it: in a subprocess, reading exit codes and output."""
import json
import subprocess

from cli_runner import nnlite


def test_console_script_is_installed():
    "The `nnlite` console script on PATH (every other test runs this interpreter's `-m nnunet_lite.cli`)."
    r = subprocess.run(["nnlite", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for sub in ("check", "synth", "demo"):
        assert sub in r.stdout


def test_synth_then_check(tmp_path):
    r = nnlite("synth", tmp_path / "ds", "--kind", "mr_aniso", "--cases", 3, "--test-cases", 1,
               "--shape", 6, 20, 20, "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert d["numTraining"] == 3 and d["channel_names"] == {"0": "T1", "1": "T2"}
    r = nnlite("check", tmp_path / "ds", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no problems found" in r.stdout


def test_check_reports_every_problem_one_line_each(dataset_copy):
    ds = dataset_copy("ct")
    (ds / "labelsTr" / "case_001.nii.gz").unlink()
    (ds / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"truncated")
    r = nnlite("check", ds, "-q")
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert any(l.startswith(str(ds / "labelsTr" / "case_001.nii.gz") + ": missing") for l in lines), lines
    unreadable = str(ds / "imagesTr" / "case_002_0000.nii.gz") + ": cannot be read"
    assert any(l.startswith(unreadable) for l in lines), lines
    assert "problem(s) found" in r.stderr


def test_check_missing_folder_is_one_line(tmp_path):
    r = nnlite("check", tmp_path / "nope", "-q")
    assert r.returncode == 1
    assert r.stdout.strip() == f"{tmp_path / 'nope'}: dataset folder not found"


def test_synth_bad_arguments_are_one_line_errors(tmp_path):
    r = nnlite("synth", tmp_path / "x", "--kind", "ct", "--channels", "2", "-q")
    assert r.returncode == 1
    assert r.stderr.strip() == "nnlite: error: a CT-like dataset has one channel"
    r = nnlite("synth", tmp_path / "x", "--kind", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_demo_runs_and_writes_its_outputs(tmp_path):
    "A tiny demo: every stage runs and writes its outputs (3 cases: fold 'all'), in float32 with --no-amp."
    r = nnlite("demo", "-o", tmp_path / "demo", "--cases", 3, "--shape", 16, 24, 24, "--epochs", 2,
               "--iters", 2, "--no-amp", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation cases on cpu (float32)" in r.stdout, r.stdout
    for step in ("[1/8]", "[4/8] preprocess 3d_fullres", "[5/8] train fold all", "[6/8] predict",
                 "[7/8] evaluate", "demo finished"):
        assert step in r.stdout, step
    demo = tmp_path / "demo"
    assert (demo / "preprocessed" / "plans.json").is_file()
    raw = demo / "Dataset001_SynthCT"
    assert json.loads((raw / "dataset.json").read_text())["numTraining"] == 3
    cases = sorted(p.name for p in (demo / "preprocessed" / "3d_fullres").glob("case_*.json"))
    assert cases == ["case_000.json", "case_001.json", "case_002.json"]
    assert (demo / "results" / "3d_fullres" / "fold_all" / "checkpoint_final.pth").is_file()
    predictions = sorted(p.name for p in (demo / "predictions").glob("*.nii.gz"))
    assert predictions == ["test_000.nii.gz", "test_001.nii.gz", "test_002.nii.gz"]
    assert "foreground_mean" in json.loads((demo / "predictions" / "summary.json").read_text())
    for figure in ("case_000.png", "case_000_preprocessed.png", "training_progress.png",
                   "test_000_prediction.png"):
        assert (demo / "figures" / figure).stat().st_size > 1000


def test_synth_is_deterministic_across_processes(tmp_path):
    for name in ("a", "b"):
        r = nnlite("synth", tmp_path / name, "--kind", "ct", "--cases", 2, "--test-cases", 0, "-q")
        assert r.returncode == 0
    for f in sorted((tmp_path / "a").rglob("*.nii.gz")):
        g = tmp_path / "b" / f.relative_to(tmp_path / "a")
        import SimpleITK as sitk
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (f, g))
        assert (a == b).all()


def test_plan_from_dataset_and_from_fingerprint(datasets, tmp_path):
    r = nnlite("plan", datasets["ct_aniso"], "-o", tmp_path / "p1", "-q")
    assert r.returncode == 0, r.stderr
    assert "3d_fullres" in r.stdout
    plans = json.loads((tmp_path / "p1" / "plans.json").read_text())
    fp = json.loads((tmp_path / "p1" / "dataset_fingerprint.json").read_text())
    assert {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
            "median_relative_size_after_cropping"} <= set(fp)
    assert plans["transpose_forward"] == [0, 1, 2] and "3d_fullres" in plans["configurations"]
    r = nnlite("plan", "--fingerprint", tmp_path / "p1" / "dataset_fingerprint.json",
               "--dataset-json", datasets["ct_aniso"] / "dataset.json", "-o", tmp_path / "p2")
    assert r.returncode == 0, r.stderr
    replanned = json.loads((tmp_path / "p2" / "plans.json").read_text())
    assert replanned["configurations"] == plans["configurations"]
    r = nnlite("plan", "--fingerprint", tmp_path / "p1" / "dataset_fingerprint.json",
               "--dataset-json", datasets["ct_aniso"] / "dataset.json", "-o", tmp_path / "p3",
               "--gpu-memory", "2", "--preset", "paper2018")
    assert r.returncode == 0, r.stderr
    assert "paper2018" in json.loads((tmp_path / "p3" / "plans.json").read_text())["experiment_planner_used"]


def test_plan_and_preprocess_in_one_command(datasets, tmp_path):
    "As nnUNetv2_plan_and_preprocess: the plans, then each configuration's cases, ready to train."
    r = nnlite("plan-and-preprocess", datasets["ct"], "-o", tmp_path / "pre", "-c", "2d", "3d_fullres", "-q")
    assert r.returncode == 0, r.stderr
    cases = sorted(p.name for p in (datasets["ct"] / "labelsTr").glob("*.nii.gz"))
    for configuration in ("2d", "3d_fullres"):
        written = sorted(p.name for p in (tmp_path / "pre" / configuration).glob("case_*.json"))
        assert written == [c.replace(".nii.gz", ".json") for c in cases], written
    written = {p.name for p in (tmp_path / "pre").iterdir()}
    assert {"plans.json", "dataset.json", "dataset_fingerprint.json"} <= written
    r = nnlite("plan-and-preprocess", datasets["ct"], "-o", tmp_path / "pre2", "-c", "3d_midres", "-q")
    assert r.returncode == 1 and "no configuration '3d_midres'" in r.stderr


def test_plan_refuses_a_broken_dataset_with_its_messages(dataset_copy, tmp_path):
    ds = dataset_copy("ct")
    (ds / "labelsTr" / "case_000.nii.gz").unlink()
    r = nnlite("plan", ds, "-o", tmp_path / "p", "-q")
    assert r.returncode == 1
    assert "refusing to plan" in r.stderr and "case_000.nii.gz: missing" in r.stderr
    assert not (tmp_path / "p" / "plans.json").exists()


def test_plan_argument_errors_are_one_line(tmp_path):
    r = nnlite("plan", "-o", tmp_path / "p")
    assert r.returncode == 1 and r.stderr.startswith("nnlite: error: give a DATASET_DIR")
    r = nnlite("plan", "--fingerprint", tmp_path / "nope.json", "-o", tmp_path / "p")
    assert r.returncode == 1 and "--dataset-json" in r.stderr
    from nnunet_lite.plans import fingerprint_from_stats
    fingerprint_from_stats([[1.0, 1.0, 1.0]] * 2, [[40, 50, 50]] * 2).save(tmp_path / "good_fp.json")
    r = nnlite("plan", "--fingerprint", tmp_path / "good_fp.json", "--dataset-json", tmp_path / "nope.json",
               "-o", tmp_path / "p")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"nnlite: error: {tmp_path / 'nope.json'}: file not found "
                                "(every dataset needs a dataset.json)")
    (tmp_path / "bad.json").write_text(
        '{"channel_names": {"0": "CT"}, "numTraining": 2, "file_ending": ".nii.gz"}')
    r = nnlite("plan", "--fingerprint", tmp_path / "good_fp.json", "--dataset-json", tmp_path / "bad.json",
               "-o", tmp_path / "p")
    assert r.returncode == 1 and "bad.json: missing required key 'labels'" in r.stderr
    (tmp_path / "ds.json").write_text('{"labels": {}}')
    (tmp_path / "fp.json").write_text("{}")
    r = nnlite("plan", "--fingerprint", tmp_path / "fp.json", "--dataset-json", tmp_path / "ds.json",
               "-o", tmp_path / "p")
    assert r.returncode == 1 and "fp.json: not a dataset fingerprint" in r.stderr
