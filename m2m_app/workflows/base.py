"""The BIDS-App workflow: one independent sub-workflow per participant/session.

T1w validation → phase 1 (tensor) → tensor maps → phase 2 (track density) → NeRF fit →
rendering and streamlines → derivatives and report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.nerf import FitField, RenderField, TrackField
from m2m_app.interfaces.outputs import WriteMaps, WriteNerf, WriteReport
from m2m_app.interfaces.translators import CheckT1w, PredictTensor, PredictTracts, TensorMaps
from m2m_app.io.naming import Subject
from m2m_app.io.timings import timings_path


@dataclass(frozen=True)
class RunOptions:
    """What the command line decides for every subject."""

    output_dir: Path
    weights_dir: str | None = None
    device: str = "auto"
    omp_nthreads: int = 1
    random_seed: int = 0
    tractogram_format: str = "trx"
    skip_phase2: bool = False
    skip_nerf: bool = False
    command_line: str = ""


PHASE1_DESC = ("Diffusion tensors were predicted from the T1w image by m2m's phase-1 translator: the T1w "
               "was reoriented to RAS, resampled to a 2 mm grid and intensity-normalised; a 2.5D U-Net "
               "generator (trained adversarially with global and PatchGAN discriminators) predicted the "
               "log-Euclidean tensor and a brain mask on axial, coronal and sagittal slices of the T1w and "
               "of its left-right mirror image; the six predictions were fused (log-Euclidean mean orientation with the views' mean eigenvalues, "
               "which keeps their anisotropy) and brought back to the T1w grid. FA, MD, AD, RD, the principal "
               "eigenvector and colour FA were computed from the predicted tensor.")
PHASE2_DESC = ("A second translator of the same design predicted a track-density image and a directionally "
               "encoded track density from the predicted FA, MD and colour FA.")
NERF_DESC = ("A neural field (learned feature grid and small MLP with positional encoding) was fitted to "
             "the predicted tractography slices along the three axes; it was volume-rendered (NeRF "
             "compositing) and traced with deterministic RK4 streamlines (m2m).")


def node_prefix(subject: Subject) -> str:
    """A Nipype-safe workflow name for a unit (``sub_01_ses_a_wf``)."""
    return "".join(c if c.isalnum() else "_" for c in subject.label) + "_wf"


def init_single_subject_wf(subject: Subject, t1w: Path, options: RunOptions,
                           timings_file: Path | None = None) -> LiterateWorkflow:
    """The m2m pipeline of one participant/session; crash files go to ``sub-X/log/``.

    ``timings_file`` is where :class:`~m2m_app.workflows.timing.StageTimer` keeps this
    unit's stage times; the writing nodes copy them into the sidecars and the report.
    """
    workflow = LiterateWorkflow(name=node_prefix(subject))
    descriptions = [PHASE1_DESC] + ([] if options.skip_phase2 else [PHASE2_DESC]) + (
        [] if options.skip_phase2 or options.skip_nerf else [NERF_DESC])
    workflow.__desc__ = " ".join(descriptions)
    torch_args = {"weights_dir": options.weights_dir, "device": options.device,
                  "num_threads": options.omp_nthreads}
    check = pe.Node(CheckT1w(t1w=str(t1w)), name="check_t1w")
    phase1 = pe.Node(PredictTensor(**torch_args), name="phase1", n_procs=options.omp_nthreads, mem_gb=3)
    maps = pe.Node(TensorMaps(), name="tensor_maps", mem_gb=3)
    where = {"output_dir": str(options.output_dir), "participant": subject.participant,
             "session": subject.session or "", "weights_dir": options.weights_dir,
             "timings": str(timings_file or "")}
    write_maps = pe.Node(WriteMaps(**where), name="write_maps", mem_gb=2)
    report = pe.Node(WriteReport(boilerplate=workflow.__desc__, command_line=options.command_line, **where),
                     name="write_report", mem_gb=2)
    workflow.connect([
        (check, phase1, [("t1w", "t1w")]),
        (check, write_maps, [("t1w", "t1w")]),
        (check, report, [("t1w", "t1w"), ("summary", "t1w_summary")]),
        (phase1, maps, [("tensor", "tensor"), ("mask", "mask")]),
        (phase1, write_maps, [("tensor", "diffusivity"), ("mask", "mask"), ("fa_sd", "fa_sd"),
                              ("v1_dispersion", "v1_dispersion")]),
        (maps, write_maps, [(k, k) for k in ("fa", "md", "ad", "rd", "v1", "colfa")]),
        (write_maps, report, [("written", "maps")]),
    ])
    if not options.skip_phase2:
        phase2 = pe.Node(PredictTracts(**torch_args), name="phase2", n_procs=options.omp_nthreads, mem_gb=3)
        workflow.connect([
            (check, phase2, [("t1w", "t1w")]),
            (phase1, phase2, [("mask", "mask")]),
            (maps, phase2, [("fa", "fa"), ("md", "md"), ("colfa", "colfa")]),
            (phase2, write_maps, [("tdi", "tdi"), ("dectdi", "dectdi"), ("tdi_sd", "tdi_sd")]),
        ])
        if not options.skip_nerf:
            seed = {"random_seed": options.random_seed, "num_threads": options.omp_nthreads}
            fit = pe.Node(FitField(device=options.device, **seed), name="nerf_fit", n_procs=options.omp_nthreads)
            render = pe.Node(RenderField(num_threads=options.omp_nthreads), name="nerf_render",
                             n_procs=options.omp_nthreads)
            track = pe.Node(TrackField(tractogram_format=options.tractogram_format, **seed),
                            name="nerf_track", n_procs=options.omp_nthreads)
            write_nerf = pe.Node(WriteNerf(**where), name="write_nerf", mem_gb=1)
            workflow.connect([
                (check, fit, [("t1w", "t1w")]), (phase1, fit, [("mask", "mask")]),
                (phase2, fit, [("tdi", "tdi"), ("dectdi", "dectdi")]),
                (fit, render, [("field", "field")]),
                (fit, track, [("field", "field"), ("mask", "mask")]), (check, track, [("t1w", "t1w")]),
                (check, write_nerf, [("t1w", "t1w")]),
                (fit, write_nerf, [("field", "field")]), (fit, report, [("report", "field_report")]),
                (render, write_nerf, [("views", "views"), ("turntable", "turntable")]),
                (track, write_nerf, [("tractogram", "tractogram"), ("sidecar", "tracking")]),
                (write_nerf, report, [("written", "nerf")]),
            ])
    log_dir = subject.folder(options.output_dir, "log")
    for name in workflow.list_node_names():
        workflow.get_node(name).config = {"execution": {"crashdump_dir": str(log_dir)}}
    return workflow


def init_m2m_wf(units: dict[Subject, Path], options: RunOptions, work_dir: Path) -> LiterateWorkflow:
    """All participants' workflows side by side (independent: one crash does not stop the others)."""
    workflow = LiterateWorkflow(name="m2m_wf", base_dir=str(work_dir))
    for subject, t1w in units.items():
        workflow.add_nodes([init_single_subject_wf(subject, t1w, options,
                                                   timings_path(work_dir, node_prefix(subject)))])
    return workflow


