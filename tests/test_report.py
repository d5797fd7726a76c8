"""The HTML reports: figures, the subject page and the group page, checked in a headless Chromium.

A small synthetic unit (conftest's synthetic head, a tiny fitted NeRF field rendered by the
real view code, straight bundles as the tractogram, one crash file) goes through
``write_report`` directly, which takes seconds instead of the minutes of a pipeline run.
"""

from __future__ import annotations

import json
import shutil

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import synthetic_head
from test_app import _browser

from m2m_app.io.naming import Subject, derivative_path, derivative_paths
from m2m_app.io.tractogram import save_tractogram
from m2m_app.maths.render import box_span, render_view
from m2m_app.models.nerf import FieldFitSettings, fit_field
from m2m_app.reports.figures import PROJECTIONS, streamline_figure
from m2m_app.reports.group import write_group_outputs
from m2m_app.reports.subject import SECTIONS, write_report
from m2m_app.tractography.views import view_orientation, write_standard_views, write_turntable

SUBJECT = Subject("01", "a")


def bundles() -> list[np.ndarray]:
    """Straight streamlines (1 mm steps, RAS+ mm): 30 left-right, 20 anterior-posterior, 10 inferior-superior."""
    t = np.arange(-20.0, 20.5, 1.0)[:, None]
    lines = [np.hstack([t, np.full_like(t, y), np.full_like(t, 10.0)]) for y in np.linspace(-20, 10, 30)]
    lines += [np.hstack([np.full_like(t, x), t - 5, np.full_like(t, 12.0)]) for x in np.linspace(-15, 15, 20)]
    lines += [np.hstack([np.full_like(t, x), np.full_like(t, -5.0), t + 10]) for x in np.linspace(-5, 5, 10)]
    return lines


@pytest.fixture(scope="module")
def unit_output(tmp_path_factory):
    """An output folder with one synthetic unit's maps, tractogram, views, turntable and a crash file."""
    root = tmp_path_factory.mktemp("report")
    out, head = root / "out", synthetic_head()
    affine = head["affine"]
    t1w = root / "sub-01_ses-a_T1w.nii.gz"
    nib.save(nib.Nifti1Image(head["t1w"], affine), t1w)
    paths = derivative_paths(out, SUBJECT, "nerf")
    written = {}
    for key in ("fa", "md", "colfa", "mask", "tdi"):
        written[key] = paths[key]
        written[key].parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(head[key], np.float32), affine), written[key])
    written["fa_sd"] = paths["fa_sd"]
    nib.save(nib.Nifti1Image((0.1 * head["fa"]).astype(np.float32), affine), written["fa_sd"])
    written["tractogram"] = save_tractogram(bundles(), nib.load(t1w), paths["tractogram"])
    torch.set_num_threads(1)
    field = fit_field(
        head["tdi"].astype(np.float32),
        head["dectdi"].astype(np.float32),
        head["mask"] > 0,
        affine,
        FieldFitSettings(max_steps=150, batch_size=1024),
        seed=0,
    )
    figures = {
        name: derivative_path(out, SUBJECT, "figures", "nerf", ".png", desc=name)
        for name in ("left", "right", "top", "front")
    }
    for path in figures.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_standard_views(field, figures, size=96, n_samples=48, bake_size=32)
    written |= {f"figure_{name}": path for name, path in figures.items()}
    written["figure_turntable"] = write_turntable(
        field,
        derivative_path(out, SUBJECT, "figures", "nerf", ".gif", desc="turntable"),
        n_frames=4,
        size=64,
        n_samples=32,
        bake_size=32,
    )
    log = SUBJECT.folder(out, "log")
    log.mkdir(parents=True)
    (log / "crash-20260101-000000-m2m-nerf_track-1234.txt").write_text(
        "Node: m2m_wf.sub_01_ses_a_wf.nerf_track\nTraceback:\nRuntimeError: tracking ran out of seeds\n"
    )
    page = write_report(
        out,
        SUBJECT,
        str(t1w),
        written,
        {"input T1w": t1w.name},
        "Diffusion tensors were predicted.",
        [],
        {"phase1": 2.0},
        command_line="m2m bids out participant",
        weights_dir=None,
    )
    return root, out, page


def test_streamline_figure_colours_and_panels(tmp_path):
    """A left-right line is drawn red, an anterior-posterior one green, in three labelled SVG panels."""
    t = np.linspace(-30, 30, 61)[:, None]
    for axis, channel in ((0, 0), (1, 1), (2, 2)):
        line = np.zeros((61, 3))
        line[:, axis] = t[:, 0]
        png = iio.imread(streamline_figure([line], tmp_path / f"line{axis}.png"))[..., :3].astype(int)
        drawn = png[(png.max(-1) > 60) & (np.ptp(png, axis=-1) > 40)]  # coloured pixels (labels are white)
        assert len(drawn) > 50 and np.bincount(drawn.argmax(-1), minlength=3).argmax() == channel
    svg = streamline_figure(bundles(), tmp_path / "lines.svg", max_streamlines=25).read_text()
    assert all(f'id="panel-{name}"' in svg for name in PROJECTIONS) and svg.count('id="panel-') == 3
    assert "25 of 60 streamlines" in svg  # text stays text (svg.fonttype none), the subsample is counted


def test_marching_only_through_the_box_renders_the_same_field():
    """A ball inside a box: rays clipped to the box (fewer samples) give the full march's image."""

    def ball(points):
        inside = np.linalg.norm(points - [2.0, -1.0, 3.0], axis=1) < 15.0
        return 0.2 * inside, np.tile([0.2, 0.9, 0.4], (len(points), 1))

    box = np.array([[-16.0, -20.0, -14.0], [20.0, 18.0, 21.0]])
    enter, leave = box_span(np.array([[-50.0, 0, 0], [-50.0, 30, 0]]), np.array([[1.0, 0, 0], [1.0, 0, 0]]), box)
    np.testing.assert_allclose([enter[0], leave[0]], [34.0, 70.0])
    assert leave[1] <= enter[1]  # the second ray passes above the box
    full = render_view(ball, box, 30.0, 20.0, 48, n_samples=512)
    clipped = render_view(ball, box, 30.0, 20.0, 48, n_samples=256, clip_to_box=True)
    assert full.max() > 0.5 and np.abs(full - clipped).max() < 0.03


def test_views_fill_the_frame_with_orientation(unit_output):
    _, out, _ = unit_output
    assert view_orientation("left") == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    assert view_orientation("top") == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    widths = []
    for name in ("left", "top", "front"):
        image = iio.imread(derivative_path(out, SUBJECT, "figures", "nerf", ".png", desc=name))
        columns = np.flatnonzero(image.max(axis=(0, 2)) > 20)
        rows = np.flatnonzero(image.max(axis=(1, 2)) > 20)
        widths.append(max(np.ptp(columns), np.ptp(rows)) / image.shape[0])
    assert max(widths) > 0.8, widths  # the widest view spans most of the frame


def _check_page(browser, uri: str) -> dict:
    """Load a page; assert every image decodes and no console error; return facts about it."""
    browser.get(uri)
    browser.execute_script("return document.fonts.ready")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);"
    )
    assert images and all(ok for _, ok in images), [src for src, ok in images if not ok]
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    return {"images": [src for src, _ in images]}


def _check_subject_page(browser, out) -> None:
    page = _check_page(browser, (out / f"{SUBJECT.label}.html").as_uri())
    assert all(not src.startswith(("/", "http", "file:")) for src in page["images"]), page["images"]
    sections = browser.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id);")
    assert sections == list(SECTIONS)
    targets = browser.execute_script(
        "return Array.from(document.querySelectorAll('nav a')).map(a => [a.getAttribute('href'),"
        " !!document.getElementById(a.getAttribute('href').slice(1))]);"
    )
    assert [href for href, _ in targets] == [f"#{key}" for key in SECTIONS] and all(ok for _, ok in targets)
    for href, _ in targets:
        browser.find_element("css selector", f'nav a[href="{href}"]').click()
        assert browser.execute_script("return location.hash;") == href
    text = browser.find_element("tag name", "body").text
    assert "nerf_track" in text and "tracking ran out of seeds" in text  # Errors: the crash file
    assert "m2m bids out participant" in text and "phase1 weights SHA-256" in text  # About
    assert "container" in text and "GPU" in text and "References" in text
    assert text.count("not computed") == 2  # v1_dispersion, tdi_sd; fa_sd is drawn
    assert any(src.endswith("_desc-m2m_fasd.png") for src in page["images"])
    for link in browser.execute_script(
        "return Array.from(document.querySelectorAll('#errors a, #methods a')).map(a => a.href);"
    ):
        browser.get(link)
        assert "ERR_FILE_NOT_FOUND" not in browser.page_source
        browser.back()
    toggle = browser.find_element("id", "fa-toggle-switch")
    before, after = (browser.find_element("css selector", f"#fa-toggle .{side} img") for side in ("before", "after"))
    assert before.is_displayed() and not after.is_displayed()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", toggle)  # clear of the sticky nav
    toggle.click()
    assert after.is_displayed() and not before.is_displayed()
    streamlines = next(src for src in page["images"] if "streamlines" in src)
    browser.get((out / streamlines).as_uri())
    panels = browser.execute_script("return Array.from(document.querySelectorAll('g[id^=\"panel-\"]')).map(g => g.id);")
    assert sorted(panels) == sorted(f"panel-{name}" for name in PROJECTIONS)


@pytest.mark.slow
def test_subject_report_in_a_browser_and_after_moving_the_folder(unit_output, tmp_path):
    root, out, page = unit_output
    assert str(root) not in page.read_text()  # nothing points outside the output folder
    browser = _browser()
    try:
        _check_subject_page(browser, out)
        moved = tmp_path / "moved" / "derivatives"
        shutil.copytree(out, moved)
        shutil.rmtree(out)
        try:
            _check_subject_page(browser, moved)
        finally:
            shutil.copytree(moved, out)
    finally:
        browser.quit()


@pytest.mark.slow
def test_group_report_table_plot_and_links(unit_output, tmp_path):
    _, source, _ = unit_output
    out = tmp_path / "out"
    shutil.copytree(source, out)
    for i, fa in enumerate([0.40, 0.41, 0.42, 0.39, 0.40, 0.90]):  # the last unit is an outlier
        unit = Subject(f"{i + 2:02d}")
        path = derivative_path(out, unit, "", "qc", ".json", desc="m2m")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"subject": unit.label, "mean_fa": fa, "brain_volume_ml": 1200.0 + i}))
        shutil.copyfile(out / f"{SUBJECT.label}.html", out / f"{unit.label}.html")
    write_group_outputs(out)
    browser = _browser()
    try:
        page = _check_page(browser, (out / "group.html").as_uri())
        assert page["images"] == ["figures/group_qc.svg"]
        rows = browser.execute_script(
            "return Array.from(document.querySelectorAll('#qc-table tr[id]')).map(r => r.id);"
        )
        assert rows == [f"row-sub-{i:02d}" for i in range(2, 8)]
        flagged = browser.execute_script(
            "return Array.from(document.querySelectorAll('td.outlier')).map(td => td.parentElement.id);"
        )
        assert flagged == ["row-sub-07"]
        links = browser.execute_script("return Array.from(document.querySelectorAll('#qc-table a')).map(a => a.href);")
        assert len(links) == 6
        for link in links:
            browser.get(link)
            assert browser.find_element("tag name", "h1").text.startswith("m2m report")
        browser.get((out / "figures" / "group_qc.svg").as_uri())
        assert "sub-07" in browser.page_source  # the outlier is labelled in the plot
    finally:
        browser.quit()


def test_failed_unit_report_shows_the_error_and_every_section(tmp_path):
    """A unit that failed before any output: no figures, the error and its crash file, all sections."""
    unit = Subject("09")
    log = unit.folder(tmp_path, "log")
    log.mkdir(parents=True)
    (log / "crash-1-phase1.txt").write_text("Node: m2m_wf.sub_09_wf.phase1\nValueError: T1w has NaN values\n")
    page = write_report(tmp_path, unit, "", None, {}, "", ["phase1: T1w has NaN values"]).read_text()
    assert all(f'<section id="{key}">' in page for key in SECTIONS) and "<img" not in page
    assert page.count("T1w has NaN values") == 2  # the error message and the crash table
    assert 'href="sub-09/log/crash-1-phase1.txt"' in page and "No outputs: this unit failed" in page
