"""The BIDS-App workflow: one independent sub-workflow per participant/session.

Each unit's workflow is composed as sMRIPrep composes its own: T1w validation →
:func:`~m2m_app.workflows.translators.init_phase1_wf` (tensor, tensor maps, the model grid)
→ :func:`~m2m_app.workflows.translators.init_phase2_wf` (track density) →
:func:`~m2m_app.workflows.nerf.init_nerf_wf` (NeRF fit, rendering, streamlines) →
:func:`~m2m_app.workflows.outputs.init_ds_wf` (derivatives and report). The T1w is
conformed to the model grid once, in phase 1; the later phases work on that grid, and the
maps are resampled onto the output grid (``--output-resolution``) only when written.
"""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.translators import CheckT1w
from m2m_app.io.naming import Subject
from m2m_app.io.timings import timings_path
from m2m_app.workflows.config import RunConfig
from m2m_app.workflows.nerf import NERF_OUTPUTS, init_nerf_wf
from m2m_app.workflows.outputs import PHASE2_INPUTS, init_ds_wf, node_name
from m2m_app.workflows.translators import TENSOR_MAPS, init_phase1_wf, init_phase2_wf


def node_prefix(subject: Subject) -> str:
    """A Nipype-safe workflow name for a unit (``sub_01_ses_a_wf``)."""
    return node_name(subject.label) + "_wf"


def init_single_subject_wf(
    subject: Subject, t1w: Path, config: RunConfig, timings_file: Path | None = None
) -> LiterateWorkflow:
    """The m2m pipeline of one participant/session; crash files go to ``sub-X/log/``.

    ``timings_file`` is where :class:`~m2m_app.workflows.timing.StageTimer` keeps this
    unit's stage times; the writing nodes copy them into the sidecars and the report.
    """
    workflow = LiterateWorkflow(name=node_prefix(subject))
    check = pe.Node(CheckT1w(t1w=str(t1w)), name="check_t1w")
    phase1_wf = init_phase1_wf(config)
    ds_wf = init_ds_wf(subject, config, timings_file)
    workflow.connect(
        [
            (check, phase1_wf, [("t1w", "inputnode.t1w")]),
            (check, ds_wf, [("t1w", "inputnode.t1w"), ("summary", "inputnode.t1w_summary")]),
            (
                phase1_wf,
                ds_wf,
                [
                    ("outputnode.tensor", "inputnode.diffusivity"),
                    *(
                        (f"outputnode.{key}", f"inputnode.{key}")
                        for key in ("grid", "mask", "fa_sd", "v1_dispersion", *TENSOR_MAPS)
                    ),
                ],
            ),
        ]
    )
    if not config.skip_phase2:
        phase2_wf = init_phase2_wf(config)
        workflow.connect(
            [
                (
                    phase1_wf,
                    phase2_wf,
                    [(f"outputnode.{key}", f"inputnode.{key}") for key in ("mask", "fa", "md", "colfa")],
                ),
                (phase2_wf, ds_wf, [(f"outputnode.{key}", f"inputnode.{key}") for key in PHASE2_INPUTS]),
            ]
        )
        if config.runs_nerf:
            nerf_wf = init_nerf_wf(config)
            workflow.connect(
                [
                    (
                        phase1_wf,
                        nerf_wf,
                        [(f"outputnode.{key}", f"inputnode.{key}") for key in ("mask", "v1_dispersion", "grid")],
                    ),
                    (
                        phase2_wf,
                        nerf_wf,
                        [("outputnode.tdi", "inputnode.tdi"), ("outputnode.dectdi", "inputnode.dectdi")],
                    ),
                    (nerf_wf, ds_wf, [(f"outputnode.{key}", f"inputnode.{key}") for key in NERF_OUTPUTS]),
                ]
            )
    ds_wf.inputs.inputnode.boilerplate = workflow.visit_desc().strip()
    log_dir = subject.folder(config.output_dir, "log")
    for name in workflow.list_node_names():
        workflow.get_node(name).config = {"execution": {"crashdump_dir": str(log_dir)}}
    return workflow


def init_m2m_wf(units: dict[Subject, Path], config: RunConfig) -> LiterateWorkflow:
    """All participants' workflows side by side (independent: one crash does not stop the others)."""
    workflow = LiterateWorkflow(name="m2m_wf", base_dir=str(config.work_dir))
    for subject, t1w in units.items():
        workflow.add_nodes(
            [init_single_subject_wf(subject, t1w, config, timings_path(config.work_dir, node_prefix(subject)))]
        )
    return workflow
