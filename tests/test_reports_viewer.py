"""The report's interactive viewer: its data preparation without a browser, and the embedded example's
report in a headless Chromium with software WebGL2 (opened from file://, as a user double-clicks it)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from conftest import synthetic_head
from test_app import _browser
from m2m_app.data.viewer import NIIVUE_BUNDLE, NIIVUE_DIR, VIEWER_SCRIPT, niivue_record
from m2m_app.io.naming import Subject
from m2m_app.reports.viewer import (
    VIEWER_VOLUMES,
    data_script,
    nifti_bytes,
    prepare_viewer_data,
    quantise,
    viewer_html,
    write_viewer,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
EXAMPLE = Subject("MNI152")


def _payload(script: str) -> dict:
    """The ``window.m2mViewerData`` object of a data script."""
    match = re.search(r"^window\.m2mViewerData = (\{.*\});$", script, flags=re.M)
    assert match, script[:200]
    return json.loads(match.group(1))


def _lines() -> list[np.ndarray]:
    """60 straight streamlines of 41 points, 1 mm apart (RAS+ mm), along x, y and z."""
    t = np.arange(-20.0, 20.5, 1.0)[:, None]
    return [np.roll(np.hstack([t, np.full_like(t, 2.0 * i), np.full_like(t, 5.0)]), i % 3, axis=1) for i in range(60)]


def _head_images(zooms: tuple[float, float, float] = (1.5, 1.5, 1.5)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An oblique synthetic head (conftest) with the viewer's volumes, and its affine."""
    head = synthetic_head("oblique", shape=(60, 70, 60), zooms=zooms)
    images = {"t1w": head["t1w"], "fa": head["fa"], "colfa": head["colfa"], "fa_sd": 0.1 * head["fa"]}
    return images, head["affine"]


def test_quantise_keeps_every_value_within_half_a_step():
    values = np.random.default_rng(1).uniform(-0.3, 2.7, (9, 8, 7)).astype(np.float32)
    levels, slope, intercept = quantise(values)
    assert levels.dtype == np.uint8 and levels.min() == 0 and levels.max() == 255
    assert np.abs(levels * slope + intercept - values).max() <= slope / 2 + 1e-6
    clipped, slope, intercept = quantise(values, top=1.0)
    assert np.allclose(clipped[values >= 1.0] * slope + intercept, 1.0)  # above the top reads as the top
    flat, slope, _ = quantise(np.full((2, 2, 2), 3.0))
    assert slope == 1.0 and not flat.any()


def test_volumes_are_downsampled_to_2_mm_with_their_values_and_orientation():
    images, affine = _head_images()
    data = prepare_viewer_data(images, affine)
    assert [v.key for v in data.volumes] == [k for k in VIEWER_VOLUMES if k in images]
    np.testing.assert_allclose(nib.affines.voxel_sizes(data.affine), 2.0)
    axes = data.affine[:3, :3] / 2.0  # the same voxel axes as the input (oblique), 2 mm steps
    np.testing.assert_allclose(axes, affine[:3, :3] / 1.5, atol=1e-6)
    shape = data.volumes[0].data.shape
    corners = nib.affines.apply_affine(data.affine, np.array([[0, 0, 0], np.array(shape) - 1]))
    source = nib.affines.apply_affine(affine, np.array([[0, 0, 0], np.array(images["t1w"].shape) - 1]))
    assert np.abs(corners - source).max() < 2.0  # the same field of view
    fa = data.volumes[1]
    assert fa.data.dtype == np.uint8 and fa.display == (0.0, 0.8)
    # The white matter's FA (its centre, far from any edge) reads back at the same world point.
    centre = nib.affines.apply_affine(np.linalg.inv(data.affine), [3.0, -5.0, 10.0]).round().astype(int)
    source_centre = nib.affines.apply_affine(np.linalg.inv(affine), [3.0, -5.0, 10.0]).round().astype(int)
    expected = images["fa"][tuple(source_centre)]
    assert expected > 0.5 and abs(fa.data[tuple(centre)] * fa.slope + fa.intercept - expected) < 0.01
    colour = data.volumes[2]
    assert colour.rgb and colour.data.shape == (*shape, 3)
    assert colour.data[tuple(centre)].argmax() == 0  # the left-right fibre is red
    t1w = data.volumes[0]
    assert t1w.display[1] > 0 and t1w.data.max() == 255
    coarse = prepare_viewer_data(*_head_images((4.0, 4.0, 4.0)))
    np.testing.assert_allclose(nib.affines.voxel_sizes(coarse.affine), 4.0)  # never upsampled


def test_streamlines_are_a_seeded_subset_thinned_to_2_mm():
    images, affine = {"t1w": np.ones((8, 8, 8), np.float32)}, np.eye(4)
    lines = _lines() + [np.zeros((1, 3))]  # 60 lines of 1 mm steps, and one point
    data = prepare_viewer_data(images, affine, lines, max_streamlines=25)
    assert len(data.streamlines) == 25 and data.n_streamlines == 61
    again = prepare_viewer_data(images, affine, lines, max_streamlines=25)
    other = prepare_viewer_data(images, affine, lines, max_streamlines=25, seed=1)
    first = [s[0].tolist() for s in data.streamlines]
    assert first == [s[0].tolist() for s in again.streamlines] != [s[0].tolist() for s in other.streamlines]
    steps = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in data.streamlines])
    assert np.allclose(steps, 2.0) and all(s.dtype == np.float32 for s in data.streamlines)
    assert len(prepare_viewer_data(images, affine, lines).streamlines) == 60  # fewer than the maximum: all drawn


def test_nifti_bytes_carry_values_display_range_and_grid():
    images, affine = _head_images()
    data = prepare_viewer_data(images, affine)
    for volume in data.volumes:
        raw = nifti_bytes(volume, data.affine)
        assert raw == nifti_bytes(volume, data.affine) and raw[:2] == b"\x1f\x8b"  # gzip, reproducible
        img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
        np.testing.assert_allclose(img.affine, data.affine, atol=1e-5)
        assert (float(img.header["cal_min"]), float(img.header["cal_max"])) == pytest.approx(volume.display)
        if volume.rgb:
            assert int(img.header["datatype"]) == 2304  # RGBA32: opaque where colour FA is lit
            rgba = np.asarray(img.dataobj)
            assert (rgba["R"] == volume.data[..., 0]).all() and ((rgba["A"] > 0) == volume.data.any(-1)).all()
        else:
            values = np.asarray(img.dataobj)
            np.testing.assert_allclose(values, volume.data * volume.slope + volume.intercept, rtol=1e-5, atol=1e-6)


def test_data_script_and_page_snippet(tmp_path):
    from trx.trx_file_memmap import load

    images, affine = _head_images()
    data = prepare_viewer_data(images, affine, _lines(), max_streamlines=25)
    unit = Subject("01", "a")
    payload = _payload(data_script(data, unit))
    assert [v["key"] for v in payload["volumes"]] == [v.key for v in data.volumes]
    tracts = payload["tractogram"]
    assert (tracts["shown"], tracts["total"]) == (25, 60)
    trx_path = tmp_path / "subset.trx"
    trx_path.write_bytes(base64.b64decode(tracts["trx"]))
    trx = load(str(trx_path))
    assert trx.streamlines._data.dtype == np.float16 and len(trx.streamlines) == 25
    np.testing.assert_allclose(trx.streamlines._data, np.concatenate(data.streamlines), atol=0.02)
    trx.close()
    files = write_viewer(tmp_path, unit, data)
    assert files["data"].parent == files["niivue"].parent == tmp_path / "sub-01" / "ses-a" / "figures"
    assert files["niivue"].read_bytes() == NIIVUE_BUNDLE.read_bytes()
    body, scripts = viewer_html(files, data, tmp_path)
    sources = re.findall(r'<script src="([^"]+)"></script>', scripts)
    assert sources == ["sub-01/ses-a/figures/niivue.min.js", "sub-01/ses-a/figures/sub-01_ses-a_desc-m2m_viewer.js"]
    assert VIEWER_SCRIPT.read_text() in scripts and 'id="viewer-status"' in body and "25 of 60" in body
    no_tracts = prepare_viewer_data(images, affine)
    assert _payload(data_script(no_tracts, unit))["tractogram"] is None


def test_niivue_bundle_matches_its_record_and_licences():
    record = niivue_record()
    bundle = NIIVUE_BUNDLE.read_bytes()
    assert hashlib.sha256(bundle).hexdigest() == record["sha256"] and len(bundle) == record["bytes"]
    head = bundle[:20000].decode()
    notices = (NIIVUE_DIR / "THIRD_PARTY_LICENSES.txt").read_text()
    for package in record["bundled"]:
        entry = f"{package['name']} {package['version']} ({package['license']})"
        assert entry in head and entry in notices  # every bundled package's licence travels with it
    assert (NIIVUE_DIR / "NIIVUE_LICENSE.txt").read_text().startswith("BSD 2-Clause License")
    assert record["license"] == "BSD-2-Clause"
    assert f"NiiVue {record['version']}" in DOCS.read_text()  # the docs name the version shipped


def _canvas_png(browser, instance: str) -> np.ndarray:
    """The pixels of one of the viewer's NiiVue canvases, drawn and read in the same task (WebGL
    clears its buffer once the frame is shown)."""
    url = browser.execute_script(
        f"const nv = window.m2mNiivue.{instance}; nv.drawScene(); return nv.canvas.toDataURL('image/png');"
    )
    return iio.imread(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))[..., :3].astype(int)


def _wait_for_viewer(browser, timeout_s: float = 180) -> tuple[str, str, int]:
    """``(state, status line, milliseconds from navigation)`` once the viewer says it is ready or failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, text, ms = browser.execute_script(
            "const s = document.getElementById('viewer-status'); return [s.dataset.state, s.textContent, s.dataset.ms];"
        )
        if state != "loading":
            return state, text, int(ms)
        time.sleep(0.2)
    raise AssertionError(f"the viewer is still loading after {timeout_s} s: {text}")


def _copy_report(out: Path, target: Path) -> Path:
    """The unit's page and its figures folder alone, copied to ``target`` (what the page needs)."""
    target.mkdir()
    shutil.copytree(EXAMPLE.folder(out, "figures"), EXAMPLE.folder(target, "figures"))
    return Path(shutil.copy2(out / f"{EXAMPLE.label}.html", target))


@pytest.mark.slow
def test_example_viewer_in_headless_chromium_from_a_copied_folder(example_outputs, tmp_path):
    """The example's report, copied elsewhere and opened from file:// in Chromium with SwiftShader:
    the viewer says what it loaded, both canvases are drawn, the crosshair reads the maps, the
    streamlines are coloured by direction, and the page asks for nothing outside its folder."""
    from selenium.webdriver.support.ui import Select

    _, out = example_outputs
    page = _copy_report(out, tmp_path / "copy")
    script = EXAMPLE.folder(out, "figures") / f"{EXAMPLE.label}_desc-m2m_viewer.js"
    payload = _payload(script.read_text())
    sidecar = next((out / "sub-MNI152" / "dwi").glob("*_space-T1w_*_tractogram.json"))
    total = json.loads(sidecar.read_text())["Count"]
    browser = _browser(webgl=True, network_log=True)
    try:
        browser.set_window_size(1200, 1000)
        browser.get(page.as_uri())
        state, status, ms = _wait_for_viewer(browser)
        assert state == "ready", status
        shown = min(5000, total)
        assert status == f"viewer: {len(payload['volumes'])} volumes, {shown:,} of {total:,} streamlines", status
        assert len(payload["volumes"]) >= 4  # T1w, FA, colour FA and the uncertainty maps
        print(f"viewer ready {ms} ms after navigation: {status}")
        browser.execute_script("document.getElementById('viewer').scrollIntoView();")
        browser.execute_script("window.m2mNiivue.tracts.opts.isOrientCube = false;")  # only the streamlines' colours
        slices, tracts = _canvas_png(browser, "slices"), _canvas_png(browser, "tracts")
        for pixels in (slices, tracts):
            assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
        coloured = tracts[(tracts.max(-1) > 80) & (np.ptp(tracts, axis=-1) > 60)]
        assert set(np.bincount(coloured.argmax(-1), minlength=3) > 200) == {True}  # red, green and blue segments
        readout = browser.find_element("id", "viewer-readout").text
        assert re.search(r"crosshair at \(-?\d+, -?\d+, -?\d+\) mm: T1w [\d.]+ · FA 0\.\d+ · colour FA \(", readout)
        Select(browser.find_element("id", "viewer-overlay")).select_by_value("colfa")
        assert np.abs(_canvas_png(browser, "slices") - slices).sum() > 0  # the overlay changed
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        requests = {
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in browser.get_log("performance")
            if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"
        }
        folder = page.parent.as_uri() + "/"
        outside = {url for url in requests if not (url.startswith(folder) or url.startswith("data:"))}
        assert not outside, outside  # nothing outside the copied folder, nothing from the network
        assert f"{folder}sub-MNI152/figures/niivue.min.js" in requests
    finally:
        browser.quit()


@pytest.mark.slow
def test_example_viewer_without_webgl2_says_so_and_keeps_the_figures(example_outputs):
    _, out = example_outputs
    browser = _browser("--disable-3d-apis")
    try:
        browser.get((out / f"{EXAMPLE.label}.html").as_uri())
        state, status, _ = _wait_for_viewer(browser, 60)
        assert state == "failed" and "no WebGL2" in status and "static figures" in status, status
        images = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);"
        )
        assert len(images) >= 10 and all(images)
    finally:
        browser.quit()


@pytest.mark.slow
def test_group_report_links_each_viewer(example_outputs):
    _, out = example_outputs
    page = (out / "group.html").read_text()
    assert re.findall(r'<a class="viewer" href="([^"]+)">', page) == [f"{EXAMPLE.label}.html#viewer"]
    assert 'id="viewer"' in (out / f"{EXAMPLE.label}.html").read_text()
