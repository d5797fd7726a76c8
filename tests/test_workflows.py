"""Graph construction of the participant workflow for the main option combinations (no data, seconds),
as fMRIPrep's test_init_fmriprep_wf; the run's RunConfig and the shared CLI plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2m_app.io.naming import Subject
from m2m_app.workflows.base import init_m2m_wf, node_prefix
from m2m_app.workflows.config import RunConfig

PHASE1 = {"check_t1w", "phase1_wf.phase1", "phase1_wf.tensor_maps", "ds_wf.write_maps", "ds_wf.write_report"}
PHASE2 = {"phase2_wf.phase2"}
NERF = {"nerf_wf.nerf_fit", "nerf_wf.nerf_render", "nerf_wf.nerf_track", "ds_wf.write_nerf"}
#: One registration per template, one writer per output space, merged for the report.
SPACE_1MM = {"ds_wf.register_MNI152NLin2009aSym", "ds_wf.write_space_MNI152NLin2009aSym", "ds_wf.merge_spaces"}
SPACES = SPACE_1MM | {"ds_wf.write_space_MNI152NLin2009aSym_res_2"}


def _config(tmp_path: Path, **options) -> RunConfig:
    return RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", work_dir=tmp_path / "work", **options)


def _edges(workflow) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """``{(source node, destination node): {(output, input)}}`` of the flattened graph, names below the unit."""
    graph = workflow._create_flat_graph()
    short = lambda node: node.fullname.split(".", 1)[1]  # noqa: E731  (<unit>.<name>)
    return {(short(u), short(v)): set(data["connect"]) for u, v, data in graph.edges(data=True)}


@pytest.mark.parametrize(
    "options, stages",
    [
        ({}, PHASE1 | PHASE2 | NERF),
        ({"skip_nerf": True}, PHASE1 | PHASE2),
        ({"skip_phase2": True}, PHASE1),
        ({"tractogram_format": "tck", "random_seed": 7, "omp_nthreads": 3}, PHASE1 | PHASE2 | NERF),
        ({"output_spaces": ("MNI152NLin2009aSym:res-2", "MNI152NLin2009aSym", "T1w")}, PHASE1 | PHASE2 | NERF | SPACES),
        ({"output_spaces": ("MNI152NLin2009aSym",), "skip_phase2": True}, PHASE1 | SPACE_1MM),
    ],
)
def test_init_m2m_wf(tmp_path, options, stages):
    t1w = tmp_path / "sub-01_T1w.nii.gz"
    t1w.touch()
    config = _config(tmp_path, **options)
    units = {Subject("01"): t1w, Subject("02", "a"): t1w}
    workflow = init_m2m_wf(units, config)
    assert workflow.base_dir == str(config.work_dir)
    for subject in units:
        unit = workflow.get_node(node_prefix(subject))
        names = {n for n in unit.list_node_names() if not n.endswith(("inputnode", "outputnode"))}
        assert names == stages
        log_dir = str(subject.folder(config.output_dir, "log"))
        for name in unit.list_node_names():  # crash files go to the unit's log folder
            assert unit.get_node(name).config["execution"]["crashdump_dir"] == log_dir
    edges = _edges(workflow.get_node("sub_01_wf"))
    assert ("phase1", "tensor_maps") in {(u.split(".")[-1], v.split(".")[-1]) for u, v in edges}
    # the model grid is conformed once, in phase 1, and handed on: no later stage reads the T1w for it;
    # the later stages take model-grid maps as they are, and the writers resample them onto the output grid
    grid_users = {v.split(".")[-1] for (u, v), pairs in edges.items() if ("grid", "grid") in pairs}
    assert grid_users >= {"write_maps", "write_report"}
    if "phase2_wf.phase2" in stages:
        assert {i for _, i in edges[("phase2_wf.inputnode", "phase2_wf.phase2")]} == {"mask", "fa", "md", "colfa"}
    if "nerf_wf.nerf_fit" in stages:
        assert {i for _, i in edges[("nerf_wf.inputnode", "nerf_wf.nerf_fit")]} == {"mask", "tdi", "dectdi"}
    t1w_users = {v.split(".")[-1] for (u, v), pairs in edges.items() if ("t1w", "t1w") in pairs}
    assert not t1w_users & {"phase2", "nerf_fit"}
    unit = workflow.get_node("sub_01_wf")
    if "nerf_wf.nerf_track" in stages:
        track = unit.get_node("nerf_wf.nerf_track").inputs
        assert track.tractogram_format == config.tractogram_format and track.random_seed == config.random_seed
        assert unit.get_node("nerf_wf.nerf_fit").n_procs == config.omp_nthreads
    if "ds_wf.merge_spaces" in stages:
        register = "ds_wf.register_MNI152NLin2009aSym"
        assert {i for _, i in edges[("ds_wf.write_maps", register)]} == {"mask"}  # the written brain mask
        for writer in {s for s in stages if "write_space" in s}:
            assert edges[(register, writer)] == {("forward", "forward"), ("inverse", "inverse")}
            assert ("ds_wf.write_nerf", writer) in edges or "nerf_wf.nerf_fit" not in stages
        assert ("ds_wf.merge_spaces", "ds_wf.write_report") in edges
    report = unit.get_node("ds_wf.inputnode").inputs.boilerplate
    assert "Diffusion tensors were predicted" in report
    assert ("track-density" in report) == ("phase2_wf.phase2" in stages)
    assert ("neural field" in report) == ("nerf_wf.nerf_fit" in stages)
    assert ("finite-strain rotation" in report) == ("ds_wf.merge_spaces" in stages)


def test_sub_workflows_have_methods_text_and_io_nodes(tmp_path):
    from m2m_app.workflows.nerf import init_nerf_wf
    from m2m_app.workflows.outputs import init_ds_wf
    from m2m_app.workflows.translators import init_phase1_wf, init_phase2_wf

    config = _config(tmp_path)
    for workflow in (
        init_phase1_wf(config),
        init_phase2_wf(config),
        init_nerf_wf(config),
        init_ds_wf(Subject("01"), config),
    ):
        assert workflow.__desc__.strip()
        assert {"inputnode", "outputnode"} <= set(workflow.list_node_names())


def test_run_config_is_saved_beside_the_unit_logs(tmp_path):
    config = _config(tmp_path, participant_labels=("01",), weights_dir="/w", nprocs=4)
    with pytest.raises(AttributeError):
        config.nprocs = 2  # frozen
    path = config.save(Subject("01", "a"))
    assert path == tmp_path / "out" / "sub-01" / "ses-a" / "log" / config.run_id / "m2m.json"
    saved = json.loads(path.read_text())
    assert saved["run"]["participant_labels"] == ["01"] and saved["run"]["output_dir"] == str(tmp_path / "out")
    assert saved["subject"] == "sub-01_ses-a" and RunConfig(**{**saved["run"]}).run_id == config.run_id


def test_m2m_builds_its_config_from_the_options(tmp_path, monkeypatch):
    from m2m_app.cli import run

    seen = {}
    monkeypatch.setattr(run, "_run_participants", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr(run, "available_cpus", lambda: 12)
    with pytest.raises(SystemExit) as done:
        run.main(
            [
                str(tmp_path / "bids"),
                str(tmp_path / "out"),
                "participant",
                "--participant-label",
                "01",
                "02",
                "--skip-nerf",
                "--tractogram-format",
                "tck",
            ]
        )
    assert done.value.code == 0
    config = seen["config"]
    assert config.participant_labels == ("01", "02") and config.skip_nerf and config.tractogram_format == "tck"
    assert config.nprocs == 12 and config.omp_nthreads == 8 and config.work_dir == (tmp_path / "m2m_work")
    assert config.output_dir.is_absolute() and config.phases == ("phase1", "phase2") and not config.runs_nerf


def test_every_command_takes_a_list_of_labels(tmp_path, monkeypatch):
    """``m2m-train prepare --participant-label 01 02`` reaches prepare with both labels (the BIDS-Apps form)."""
    from m2m_app.cli import train

    seen = {}
    monkeypatch.setattr(train.prepare, "callback", lambda **kwargs: seen.update(kwargs))
    with pytest.raises(SystemExit):
        train.main(
            [
                "prepare",
                str(tmp_path / "bids"),
                str(tmp_path / "prep"),
                "--participant-label",
                "01",
                "02",
                "--session-label",
                "a",
                "b",
            ]
        )
    assert seen["participant_labels"] == ("01", "02") and seen["session_labels"] == ("a", "b")


def test_collect_units_keeps_failures_with_their_codes():
    from m2m_app.cli.common import collect_units
    from m2m_app.errors import BadDataError, MissingInputError

    def find(subject: Subject) -> str | None:
        if subject.participant == "02":
            raise MissingInputError("no T1w")
        if subject.participant == "03":
            raise BadDataError("NaN")
        return None if subject.participant == "04" else f"{subject.label}_T1w.nii.gz"

    units, failures = collect_units([Subject(p) for p in ("01", "02", "03", "04")], find)
    assert units == {Subject("01"): "sub-01_T1w.nii.gz"}
    assert {label: err.exit_code for label, err in failures.items()} == {"sub-02": 66, "sub-03": 65}


@pytest.mark.parametrize("dwi_source, registration", [("raw", "avants2008"), ("qsiprep", "cieslak2021")])
@pytest.mark.parametrize("atlases", [("DesikanKilliany",), ()])
def test_teacher_methods_text_has_its_references_in_bibtex(tmp_path, dwi_source, registration, atlases):
    """Every work the teacher's methods text cites is in the .bib that prepare writes beside it, with the
    library versions; with QSIPrep's DWI the text cites QSIPrep and says that nothing was registered; the
    atlas and its registration only with --atlases."""
    import re
    from importlib.metadata import version

    from m2m_app.reports.methods import TEACHER_SOFTWARE, teacher_cited, write_bibtex
    from m2m_app.workflows.prepare import init_prepare_wf

    keys = teacher_cited(dwi_source, bool(atlases))
    workflow = init_prepare_wf({}, tmp_path / "prep", tmp_path / "work", dwi_source=dwi_source, atlases=atlases)
    text = workflow.visit_desc()
    cited = {(author.lower(), year) for author, year in re.findall(r"(\w+) et al\., (\d{4})", text)}
    assert len(cited) == 5 and cited <= {(key[:-4], key[-4:]) for key in keys}
    assert (registration[:-4], registration[-4:]) in cited
    assert ("no registration" in text) == (dwi_source == "qsiprep")
    assert ("Desikan-Killiany" in text) == bool(atlases) == ("desikan2006" in keys)
    bib = write_bibtex(tmp_path / "CITATION.bib", keys, TEACHER_SOFTWARE).read_text()
    assert all(f"{{{key}," in bib for key in keys)
    assert f"version = {{{version('dipy')}}}" in bib and "@software{antspyx," in bib
