"""The BIDS-App end to end on a real subject, and its bad-input matrix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from bids import BIDSLayout

from conftest import DS_REAL, ds_real_unit, make_bids, read_only_mount_prefix, requires_ds_real, run_cli
from m2m_app.io import bids as bids_io
from m2m_app.io.derivatives import QC_WM_FA

REAL_T1W = DS_REAL / "sub-02/ses-hfs/anat/sub-02_ses-hfs_acq-fl2d_T1w.nii.gz"
PARAMS = ("fa", "md", "ad", "rd", "diffusivity", "v1", "colfa")
TEMPLATE = "MNI152NLin2009aSym"
UNCERTAINTY = (
    "model-tensor_param-fa_desc-sd",
    "model-tensor_param-v1_desc-dispersion",
    "tract-wholebrain_param-tdi_desc-sd",
)


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    """One run on a real subject (sub-02, ses-hfs: PSR, 1x1x4.8 mm) beside a subject with a NaN T1w."""
    if not DS_REAL.exists():
        pytest.skip(f"{DS_REAL} is not present")
    root = tmp_path_factory.mktemp("app")
    nan = np.asarray(nib.load(REAL_T1W).dataobj, dtype=np.float32)
    nan[10, 10, 10] = np.nan
    bad = nib.Nifti1Image(nan, nib.load(REAL_T1W).affine)
    bad_path = root / "bad_T1w.nii"
    nib.save(bad, bad_path)
    bids = make_bids(root / "bids", {**ds_real_unit("02", "hfs", ("anat",)), "sub-03/anat/sub-03_T1w.nii": bad_path})
    # The BIDS layout: derivatives inside the dataset; the default work folder lies beside the dataset.
    out, work = bids / "derivatives" / "m2m", root / "m2m_work" / "bids"
    result = run_cli(
        "run",
        bids,
        out,
        "participant",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "2",
        "--skip-bids-validation",
        "--output-spaces",
        f"{TEMPLATE}:res-2",
        "T1w",
        "--atlases",
        "DesikanKilliany",
    )
    return bids, out, work, result


@pytest.mark.slow
@requires_ds_real
def test_participant_run_writes_every_derivative(app_run):
    bids, out, _, result = app_run
    assert result.returncode == 65, result.stderr[-3000:]  # sub-03's NaN T1w is bad data ...
    assert "sub-03" in result.stderr and "NaN" in result.stderr and "Traceback" not in result.stderr
    t1w = nib.load(REAL_T1W)
    dwi = out / "sub-02" / "ses-hfs" / "dwi"
    prefix = "sub-02_ses-hfs_space-T1w"
    for param in PARAMS:  # ... while sub-02 is complete
        img = nib.load(dwi / f"{prefix}_model-tensor_param-{param}_dwimap.nii.gz")
        assert img.shape[:3] == t1w.shape and np.allclose(img.affine, t1w.affine, atol=1e-4)
        sidecar = json.loads((dwi / f"{prefix}_model-tensor_param-{param}_dwimap.json").read_text())
        assert "predicted" in sidecar["Description"] and sidecar["Weights"]["phase1"]["sha256"]
        assert sidecar["Sources"] == ["bids:raw:sub-02/ses-hfs/anat/sub-02_ses-hfs_acq-fl2d_T1w.nii.gz"]
    assert nib.load(dwi / f"{prefix}_model-tensor_param-diffusivity_dwimap.nii.gz").shape[3] == 6
    fa = nib.load(dwi / f"{prefix}_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
    mask = nib.load(out / "sub-02/ses-hfs/anat" / f"{prefix}_desc-brain_mask.nii.gz").get_fdata() > 0
    assert mask.sum() > 1000 and 0.0 < fa[mask].mean() < 1.0
    for param in ("tdi", "dectdi"):
        assert nib.load(dwi / f"{prefix}_tract-wholebrain_param-{param}_dwimap.nii.gz").shape[:3] == t1w.shape
    uncertainty = {name: dwi / f"{prefix}_{name}_dwimap.nii.gz" for name in UNCERTAINTY}
    for name, path in uncertainty.items():  # the uncertainty maps: on the T1w grid, finite, >= 0, zero outside the mask
        img = nib.load(path)
        assert img.shape == t1w.shape and np.allclose(img.affine, t1w.affine, atol=1e-4)
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0 and not data[~mask].any() and data[mask].max() > 0
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Units"] and "UncertaintyScale" in sidecar and "predicted" in sidecar["Description"]
    assert nib.load(uncertainty["model-tensor_param-v1_desc-dispersion"]).get_fdata().max() <= 90.0 + 1e-3
    qc = json.loads((out / "sub-02/ses-hfs" / "sub-02_ses-hfs_desc-m2m_qc.json").read_text())
    fa_sd = nib.load(uncertainty["model-tensor_param-fa_desc-sd"]).get_fdata()
    assert qc["median_fa_sd_wm"] == pytest.approx(np.median(fa_sd[mask & (fa > QC_WM_FA)]), rel=1e-5)
    tractogram = dwi / f"{prefix}_tract-wholebrain_track-nerf_tractogram.trx"
    sidecar = json.loads(tractogram.with_suffix(".json").read_text())
    assert sidecar["TractographyMethod"] == "deterministic" and "SeedingMethod" in sidecar
    from trx.trx_file_memmap import load as load_trx

    trx = load_trx(str(tractogram))
    assert len(trx.streamlines) == sidecar["Count"] > 0
    trx.close()
    assert (out / "sub-02_ses-hfs.html").exists() and (out / "sub-03.html").exists()
    assert "NaN" in (out / "sub-03.html").read_text()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "m2m"
    assert "tensor" in (out / "logs" / "CITATION.md").read_text()


@pytest.mark.slow
@requires_ds_real
def test_derivatives_are_indexed_by_pybids(app_run):
    bids, out, _, _ = app_run
    layout = BIDSLayout(str(bids), validate=False, derivatives=str(out))
    found = layout.get(
        scope="derivatives",
        subject="02",
        session="hfs",
        space="T1w",
        suffix="dwimap",
        extension=".nii.gz",
        return_type="file",
    )
    names = {os.path.basename(f) for f in found}
    assert "sub-02_ses-hfs_space-T1w_model-tensor_param-fa_dwimap.nii.gz" in names
    assert len(names) == len(PARAMS) + 2 + len(UNCERTAINTY)
    in_template = layout.get(
        scope="derivatives",
        subject="02",
        space=TEMPLATE,
        res="2",
        suffix="dwimap",
        extension=".nii.gz",
        return_type="file",
    )
    in_template = {os.path.basename(f) for f in in_template}
    assert len(in_template) == len(PARAMS) + 2  # the tensor maps and the two phase-1 uncertainty maps


@pytest.mark.slow
@requires_ds_real
def test_template_space_outputs_follow_the_written_transforms(app_run):
    """ANTs applying m2m's written transforms reproduces m2m's template-space FA and moves the
    streamlines' points where m2m put them; the registration's QC reaches the QC row and the report."""
    import ants
    import pandas as pd

    from m2m_app.io.tractogram import load_streamlines
    from m2m_app.maths.metrics import pearson

    _, out, _, _ = app_run
    unit, anat, dwi = out / "sub-02/ses-hfs", out / "sub-02/ses-hfs/anat", out / "sub-02/ses-hfs/dwi"
    forward = anat / f"sub-02_ses-hfs_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5"
    inverse = anat / f"sub-02_ses-hfs_from-{TEMPLATE}_to-T1w_mode-image_xfm.h5"
    space = f"sub-02_ses-hfs_space-{TEMPLATE}_res-2"
    for param in PARAMS:
        assert (dwi / f"{space}_model-tensor_param-{param}_dwimap.nii.gz").exists()
    mask = nib.load(anat / f"{space}_desc-brain_mask.nii.gz").get_fdata() > 0
    fa_path = dwi / f"{space}_model-tensor_param-fa_dwimap.nii.gz"
    sidecar = json.loads(fa_path.with_name(fa_path.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["SpatialReference"] == TEMPLATE and sidecar["Transform"] == forward.name
    assert sidecar["Weights"]["phase1"]["sha256"] and "predicted" in sidecar["Description"]
    t1w_fa = ants.image_read(str(dwi / "sub-02_ses-hfs_space-T1w_model-tensor_param-fa_dwimap.nii.gz"))
    by_ants = ants.apply_transforms(ants.image_read(str(fa_path)), t1w_fa, [str(forward)], interpolator="linear")
    assert pearson(by_ants.numpy()[mask], nib.load(fa_path).get_fdata()[mask]) >= 0.99
    native_fa = dwi / "sub-02_ses-hfs_space-T1w_model-tensor_param-fa_dwimap.nii.gz"
    native = load_streamlines(dwi / "sub-02_ses-hfs_space-T1w_tract-wholebrain_track-nerf_tractogram.trx", native_fa)
    moved = load_streamlines(dwi / f"{space}_tract-wholebrain_track-nerf_tractogram.trx", str(fa_path))
    assert len(moved) == len(native) > 0
    moved_sidecar = json.loads((dwi / f"{space}_tract-wholebrain_track-nerf_tractogram.json").read_text())
    assert moved_sidecar["Count"] == len(moved) and moved_sidecar["SpatialReference"] == TEMPLATE
    assert moved_sidecar["Transform"] == inverse.name and "SeedingMethod" in moved_sidecar
    picks = np.random.default_rng(0).choice(sum(map(len, native)), 300, replace=False)
    points = np.concatenate(native)[picks]
    lps = pd.DataFrame({"x": -points[:, 0], "y": -points[:, 1], "z": points[:, 2]})
    by_ants = ants.apply_transforms_to_points(3, lps, [str(inverse)]).to_numpy()[:, :3] * [-1, -1, 1]
    assert np.percentile(np.linalg.norm(np.concatenate(moved)[picks] - by_ants, axis=1), 95) < 0.5  # mm
    qc = json.loads((unit / "sub-02_ses-hfs_desc-m2m_qc.json").read_text())
    assert qc[f"{TEMPLATE}:res-2_dice"] > 0.9 and qc[f"{TEMPLATE}:res-2_flagged"] is False
    report = (out / "sub-02_ses-hfs.html").read_text()
    assert '<section id="spaces">' in report and "desc-normalization_T1w.svg" in report


@pytest.mark.slow
@requires_ds_real
def test_regions_and_connectome_agree_with_mrtrix3(app_run, tmp_path):
    """The parcellation, region table and connectome of a real T1w: MRtrix3's tck2connectome on
    m2m's own tractogram and dseg gives the same count matrix (r ≥ 0.95 over the upper triangle)."""
    from m2m_app.io.files import read_tsv
    from tests.test_regions import mrtrix_count_correlation

    _, out, _, _ = app_run
    unit = out / "sub-02/ses-hfs"
    r, ours, theirs = mrtrix_count_correlation(unit, tmp=tmp_path)
    assert r >= 0.95 and ours.sum() > 100, (r, ours.sum(), theirs.sum())
    table = read_tsv(unit / "dwi/sub-02_ses-hfs_space-T1w_seg-DesikanKilliany_model-tensor_dwimap.tsv")
    found = [row for row in table if float(row["volume_mm3"]) > 0]
    assert len(table) == 83 and len(found) >= 75
    assert 0.1 < np.median([float(row["fa_mean"]) for row in found]) < 0.6
    qc = json.loads((unit / "sub-02_ses-hfs_desc-m2m_qc.json").read_text())
    assert qc["DesikanKilliany_regions_found"] == len(found) and 0.5 < qc["DesikanKilliany_assigned_fraction"] <= 1
    report = (out / "sub-02_ses-hfs.html").read_text()
    assert '<section id="regions">' in report and "stat-count_relmat.svg" in report


@pytest.mark.slow
@requires_ds_real
def test_rerun_resumes_from_the_work_dir_and_group_level(app_run):
    """A second run in BIDS_DIR/derivatives/m2m finds the same T1w and nothing else, and resumes:
    no computing stage runs again (its result file is untouched) and the outputs are byte-identical."""
    bids, out, work, _ = app_run
    assert work.is_dir() and not (bids / "derivatives" / "m2m_work").exists()
    layout = bids_io.load_layout(bids)
    assert [bids_io.find_t1w(layout, unit).name for unit in bids_io.collect_subjects(layout)] == [
        REAL_T1W.name,
        "sub-03_T1w.nii",
    ]
    fa = out / "sub-02/ses-hfs/dwi/sub-02_ses-hfs_space-T1w_model-tensor_param-fa_dwimap.nii.gz"
    before = fa.read_bytes()
    computed = [p for p in work.glob("m2m_wf/sub_02_ses_hfs_wf/**/result_*.pklz") if "ds_wf" not in p.parts]
    results = {p: p.stat().st_mtime_ns for p in computed}  # the writers write again (the same bytes)
    assert len(results) > 5
    result = run_cli(
        "run",
        bids,
        out,
        "participant",
        "--participant-label",
        "02",
        "--skip-bids-validation",
        "--nprocs",
        "2",
        "--output-spaces",
        f"{TEMPLATE}:res-2",
        "T1w",
        "--atlases",
        "DesikanKilliany",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running 1 participant/session(s): sub-02_ses-hfs" in result.stderr
    assert fa.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in results} == results
    result = run_cli("run", bids, out, "group")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "group_qc.tsv").read_text().splitlines()
    assert table[0].startswith("subject") and any(line.startswith("sub-02_ses-hfs") for line in table[1:])
    regions = (out / "group_space-T1w_seg-DesikanKilliany_model-tensor_dwimap.tsv").read_text().splitlines()
    assert regions[0].startswith("participant_id\tsession_id\tindex\tname") and len(regions) == 1 + 83
    assert all(line.startswith("sub-02\tses-hfs\t") for line in regions[1:])


#: Chromium's software WebGL2 (SwiftShader through ANGLE), for the report's viewer where there is no GPU.
SOFTWARE_WEBGL = ("--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")


def _browser(*flags: str, webgl: bool = False, network_log: bool = False):
    """A headless Chromium driven by Selenium, with the browser console captured (skip without one).

    ``webgl``: software WebGL2 (:data:`SOFTWARE_WEBGL`) instead of ``--disable-gpu``; ``network_log``:
    Chrome's performance log too (``browser.get_log("performance")``: every request the page makes);
    ``flags``: more command-line switches.
    """
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("Chromium and chromedriver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        *(SOFTWARE_WEBGL if webgl else ("--disable-gpu",)),
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        *flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if network_log else {})})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
@requires_ds_real
def test_reports_load_in_a_real_browser(app_run):
    """Every report page loads with no console error and every image (mosaics, views, turntable) decodes."""
    bids, out, _, _ = app_run
    run_cli("run", bids, out, "group")
    browser = _browser()
    try:
        for page in ("sub-02_ses-hfs.html", "sub-03.html", "group.html"):
            browser.get((out / page).as_uri())
            images = browser.execute_script(
                "return Array.from(document.images)"
                ".map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);"
            )
            assert all(ok for _, ok in images), (page, [src for src, ok in images if not ok])
            errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
            assert not errors, (page, errors)
            if page == "sub-02_ses-hfs.html":
                sources = {src.rsplit("/", 1)[-1] for src, _ in images}
                assert len(images) >= 10 and any(s.endswith(".gif") for s in sources), sources
                text = browser.find_element("tag name", "body").text
                assert "streamlines" in text and "phase1" in text and "Methods" in text
                sidecar = next((out / "sub-02" / "ses-hfs" / "dwi").glob("*_space-T1w_*_tractogram.json"))
                assert f"{json.loads(sidecar.read_text())['Count']} (" in text
    finally:
        browser.quit()


def _tiny_t1w(path, data):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, code, words",
    [
        ("no_t1w", 66, "no T1w"),
        ("four_d", 65, "3D"),
        ("two_d", 65, "2D"),
        ("nan", 65, "NaN"),
        ("inf", 65, "infinite"),
        ("zeros", 65, "all zeros"),
        ("binary_mask", 65, "no contrast"),
        ("truncated", 65, "truncated"),
        ("unknown_label", 66, "not found"),
        ("output_is_input", 64, "must not be"),
        ("work_in_input", 64, "must not be"),
        ("read_only_output", 73, "not writable"),
        ("output_under_a_file", 73, "cannot create"),
    ],
)
def test_bad_inputs_give_clear_messages_and_codes(tmp_path, case, code, words):
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 100, size=(20, 20, 20))
    files = {
        "four_d": _tiny_t1w(tmp_path / "a.nii", rng.uniform(0, 100, size=(20, 20, 20, 3))),
        "two_d": _tiny_t1w(tmp_path / "b.nii", rng.uniform(0, 100, size=(20, 20, 1))),
        "nan": _tiny_t1w(tmp_path / "c.nii", np.where(volume > 99, np.nan, volume)),
        "inf": _tiny_t1w(tmp_path / "e.nii", np.where(volume > 99, -np.inf, volume)),
        "zeros": _tiny_t1w(tmp_path / "d.nii", np.zeros((20, 20, 20))),
        "binary_mask": _tiny_t1w(tmp_path / "f.nii", (volume > 50).astype(float)),
    }
    good = _tiny_t1w(tmp_path / "good.nii", volume)
    if case == "truncated":
        raw = nib.Nifti1Image(volume.astype(np.float32), np.eye(4))
        nib.save(raw, tmp_path / "t.nii.gz")
        content = (tmp_path / "t.nii.gz").read_bytes()
        layout = {"sub-01/anat/sub-01_T1w.nii.gz": content[: len(content) // 2]}
    elif case == "no_t1w":
        layout = {"sub-01/dwi/sub-01_dwi.nii": good}
    else:
        layout = {"sub-01/anat/sub-01_T1w.nii": files.get(case, good)}
    bids = make_bids(tmp_path / "bids", layout)
    out = tmp_path / "out"
    args = [bids, out, "participant", "--skip-bids-validation", "--skip-phase2"]
    if case == "unknown_label":
        args += ["--participant-label", "sub-99"]
    elif case == "output_is_input":
        args[1] = bids
    elif case == "work_in_input":
        args += ["-w", bids / "work"]
    elif case == "output_under_a_file":
        (tmp_path / "a_file").write_text("")
        args[1] = tmp_path / "a_file" / "out"
    prefix = ()
    if case == "read_only_output":
        out.mkdir()
        if os.geteuid() == 0:  # root ignores permission bits: mount a read-only file system there instead
            prefix = read_only_mount_prefix(out)
        else:
            out.chmod(0o500)
    result = run_cli("run", *args, prefix=prefix)
    assert result.returncode == code, result.stderr[-2000:]
    assert words in result.stderr and "Traceback" not in result.stderr


def test_help_teaches():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for word in ("participant", "--participant-label", "--use-plugin", "Exit codes", "example-data"):
        assert word in result.stdout


@pytest.mark.slow
def test_readme_example_runs_end_to_end(example_outputs):
    """The README's first command: the embedded example dataset through the whole app (the shared
    example run of conftest.py, which adds a template space and an atlas to it: one pipeline run in CI)."""
    _, out = example_outputs
    report = (out / "sub-MNI152.html").read_text()
    assert "predicted from the T1w" in report and "figures/" in report
    assert (out / "sub-MNI152" / "sub-MNI152_desc-m2m_qc.json").exists()


def test_resource_options_reach_the_nipype_plugin(tmp_path):
    from m2m_app.cli.common import plugin_settings

    settings = plugin_settings(3, 4096, None)
    assert settings["plugin"] == "MultiProc" and settings["plugin_args"]["n_procs"] == 3
    assert settings["plugin_args"]["memory_gb"] == 4.0 and settings["plugin_args"]["mp_context"] == "forkserver"
    assert plugin_settings(1, None, None)["plugin"] == "Linear"
    yaml_file = tmp_path / "slurm.yml"
    yaml_file.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: --mem=8G\n")
    assert plugin_settings(4, None, yaml_file) == {"plugin": "SLURM", "plugin_args": {"sbatch_args": "--mem=8G"}}
    yaml_file.write_text("just: words\n")
    with pytest.raises(Exception, match="needs a 'plugin:' key"):
        plugin_settings(4, None, yaml_file)


_PRELOAD_PROBE = """
import sys
from pathlib import Path
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from m2m_app.cli.common import plugin_settings, run_workflow


def preloaded():
    import sys
    return "torch" in sys.modules and "m2m_app.inference.predict" in sys.modules


if __name__ == "__main__":  # the forkserver imports this module too
    workflow = pe.Workflow(name="probe", base_dir=sys.argv[1])
    node = pe.Node(niu.Function(function=preloaded, input_names=[], output_names=["out"]), name="probe")
    workflow.add_nodes([node])
    assert run_workflow(workflow, plugin_settings(2, None, None), stop_on_first_crash=True)
    print(workflow.config["execution"]["poll_sleep_duration"], "torch" in sys.modules)
"""


def test_multiproc_workers_start_with_torch_and_the_nodes_imported(tmp_path):
    """MultiProc's forkserver imports torch and m2m's nodes once, so each node's worker (one per task)
    starts with them; the main process still has no torch; the scheduler looks every 0.1 s."""
    from nipype.utils.filemanip import loadpkl

    probe = tmp_path / "probe.py"  # a file: Nipype's Function node reads its function's source
    probe.write_text(_PRELOAD_PROBE)
    result = subprocess.run([sys.executable, str(probe), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["0.1", "False"]
    assert loadpkl(tmp_path / "probe" / "probe" / "result_probe.pklz").outputs.out is True


def test_stage_timer_keeps_each_stage_time(tmp_path, caplog):
    from types import SimpleNamespace

    from m2m_app.io.timings import read_timings, timings_path
    from m2m_app.workflows.timing import StageTimer

    timer = StageTimer(tmp_path, {"sub_01_wf": "sub-01"})
    ran = SimpleNamespace(
        fullname="m2m_wf.sub_01_wf.phase1", result=SimpleNamespace(runtime=SimpleNamespace(duration=3.25))
    )
    crashed = SimpleNamespace(fullname="m2m_wf.sub_01_wf.phase2")  # no result: timed from its start
    caplog.set_level("INFO", logger="m2m")
    for node in (ran, crashed):
        timer(node, "start")
    timer(ran, "end")
    timer(crashed, "exception")
    timings = read_timings(timings_path(tmp_path, "sub_01_wf"))
    assert timings["phase1"] == 3.25 and 0 <= timings["phase2"] < 5
    assert "sub-01: phase1 finished in 3.2 s" in caplog.text and "sub-01: phase2 FAILED" in caplog.text
