"""The teacher workflow of ``m2m-train prepare``: one independent node per participant/session."""
from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.teacher import PrepareSubject
from m2m_app.io.naming import Subject


def node_name(subject: Subject) -> str:
    """A Nipype-safe node name for a unit (``prepare_sub_01_ses_a``)."""
    return "prepare_" + "".join(c if c.isalnum() else "_" for c in subject.label)


def init_prepare_wf(units: dict[Subject, tuple[Path, list[Path]]], prep_dir: Path,
                    work_dir: Path, random_seed: int = 0) -> LiterateWorkflow:
    """Build the teacher workflow: ``units`` maps each unit to its T1w and DWI runs."""
    workflow = LiterateWorkflow(name="m2m_prepare_wf", base_dir=str(work_dir))
    workflow.__desc__ = (
        "Training targets were computed by m2m's teacher: a weighted-least-squares tensor fit "
        "(dipy) of the DWI inside a median_otsu brain mask, rigid mutual-information registration "
        "of the mean b0 to the T1w (dipy), log-Euclidean resampling with tensor rotation onto "
        "the T1w grid, and deterministic tensor tractography (dipy EuDX) seeded in FA > 0.3.")
    for subject, (t1w, dwi) in units.items():
        node = pe.Node(PrepareSubject(participant=subject.participant, session=subject.session or "",
                                      t1w=str(t1w), dwi=[str(p) for p in dwi], prep_dir=str(prep_dir),
                                      random_seed=random_seed),
                       name=node_name(subject), mem_gb=6.0, n_procs=1, overwrite=True)
        workflow.add_nodes([node])
    return workflow
