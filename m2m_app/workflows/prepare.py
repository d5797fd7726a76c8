"""The teacher workflow of ``m2m-train prepare``: one independent node per participant/session."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.spaces import TeacherRegions
from m2m_app.interfaces.teacher import PrepareSubject
from m2m_app.io.manifest import qc_path
from m2m_app.io.naming import Subject


def node_name(subject: Subject) -> str:
    """A Nipype-safe node name for a unit (``prepare_sub_01_ses_a``)."""
    return "prepare_" + "".join(c if c.isalnum() else "_" for c in subject.label)


def init_prepare_wf(
    units: dict[Subject, tuple[Path, list[Path]]],
    prep_dir: Path,
    work_dir: Path,
    random_seed: int = 0,
    num_threads: int = 1,
    source_link: str = "raw",
    dwi_source: str = "raw",
    atlases: Sequence[str] = (),
    prepared: Collection[Subject] = (),
) -> LiterateWorkflow:
    """Build the teacher workflow: ``units`` maps each unit to its T1w and DWI runs, all from the
    BIDS dataset that ``prep_dir`` links as ``source_link``; ``dwi_source`` ``qsiprep``: QSIPrep's
    preprocessed T1w and DWI, in one space, so not registered (see
    :func:`~m2m_app.teacher.prepare.prepare_subject`). After each unit, its parcellation, region
    table and connectome for each of ``atlases`` (names of
    :data:`~m2m_app.data.atlases.ATLASES`); the units in ``prepared`` already hold their targets
    and get only those."""
    workflow = LiterateWorkflow(name="m2m_prepare_wf", base_dir=str(work_dir))
    if dwi_source == "qsiprep":
        alignment = (
            "Each DWI series had been preprocessed by QSIPrep (Cieslak et al., 2021), which resampled it into the "
            "space of its preprocessed T1w, so no registration was run (identity transform). Its tensor was "
            "fitted by weighted least squares (dipy (Garyfallidis et al., 2014)) on the b=0 volumes and the shells "
            "up to b = 1500 s/mm², inside a dilated median_otsu mask. Tensors were brought to the T1w grid with "
            "log-Euclidean interpolation"
        )
    else:
        alignment = (
            "Each DWI series (runs sharing a grid and phase-encoding direction) had its tensor fitted by weighted "
            "least squares (dipy (Garyfallidis et al., 2014)) on the b=0 volumes and the shells up to "
            "b = 1500 s/mm², inside a dilated median_otsu mask; its mean b0 was registered rigidly to the T1w by "
            "Mattes mutual information (dipy), starting from the image headers and from the centres of mass and "
            "keeping the lower cost within 12 mm of the headers, and checked against an independent ANTs rigid "
            "registration (Avants et al., 2008). Tensors were brought to the T1w grid with log-Euclidean "
            "interpolation and tensor rotation"
        )
    workflow.__desc__ = (
        "Training targets were computed by m2m's teacher. The T1w's brain mask came from deepbet "
        "(Fisch et al., 2024) and its tissue classes from ANTs Atropos (Avants et al., 2011) after N4 bias correction "
        f"(Tustison et al., 2010). {alignment} (series averaged in the log domain), limited to the brain mask and "
        "the DWI's field of view, and tracked deterministically (dipy EuDX, seeds in FA > 0.3)."
    )
    if atlases:
        workflow.__desc__ += (
            " The T1w, brain-extracted with that mask, was registered to the MNI152NLin2009aSym template with ANTs "
            "(rigid, affine, SyN), the Desikan-Killiany atlas brought back onto the T1w grid (nearest neighbour), and "
            "per region the tensor maps were averaged and the streamlines' end points assigned (4 mm radial search) "
            "to build a connectome."
        )
    for subject, (t1w, dwi) in units.items():
        prepare = None
        if subject not in prepared:
            prepare = pe.Node(
                PrepareSubject(
                    participant=subject.participant,
                    session=subject.session or "",
                    t1w=str(t1w),
                    dwi=[str(p) for p in dwi],
                    prep_dir=str(prep_dir),
                    random_seed=random_seed,
                    num_threads=num_threads,
                    source_link=source_link,
                    dwi_source=dwi_source,
                ),
                name=node_name(subject),
                mem_gb=6.0,
                n_procs=num_threads,
                overwrite=True,
            )
            workflow.add_nodes([prepare])
        if not atlases:
            continue
        regions = pe.Node(
            TeacherRegions(
                participant=subject.participant,
                session=subject.session or "",
                t1w=str(t1w),
                prep_dir=str(prep_dir),
                atlases=list(atlases),
                random_seed=random_seed,
                num_threads=num_threads,
            ),
            name=node_name(subject).replace("prepare_", "regions_", 1),
            mem_gb=3.0,
            n_procs=num_threads,
            overwrite=True,  # built only when the prep dir lacks them: the work folder's cache must not say "done"
        )
        if prepare is None:
            regions.inputs.qc_file = str(qc_path(prep_dir, subject))
            workflow.add_nodes([regions])
        else:
            workflow.connect(prepare, "qc_file", regions, "qc_file")
    return workflow
