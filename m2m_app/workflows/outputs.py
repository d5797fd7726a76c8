"""The derivatives of one participant/session as a sub-workflow: maps, phase-3 outputs, report.

Three writing nodes, so that a failure in phase 3 does not keep the tensor maps from
reaching the output folder; the report (and, last, the QC JSON that marks the unit
finished) comes after both.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.data.weights import fa_detail_values
from m2m_app.interfaces.outputs import WriteMaps, WriteNerf, WriteReport
from m2m_app.interfaces.spaces import RegisterToTemplate, WriteRegions, WriteTemplateSpace
from m2m_app.io.naming import Subject
from m2m_app.maths.detail import fa_detail_from
from m2m_app.workflows.config import RunConfig
from m2m_app.workflows.nerf import NERF_OUTPUTS
from m2m_app.workflows.translators import TENSOR_MAPS

#: Inputs of :func:`init_ds_wf` from phase 1, phase 2 and phase 3.
PHASE1_INPUTS = ("diffusivity", "mask", "fa_sd", "v1_dispersion", *TENSOR_MAPS)
PHASE2_INPUTS = ("tdi", "dectdi", "tdi_sd")
NERF_INPUTS = NERF_OUTPUTS

DS_DESC = "The maps were written on {} as BIDS-Derivatives (BEP016 names for the diffusion maps{}).\n\n"


def output_grid_desc(resolution_mm: float | None) -> str:
    """The methods text's name of the output grid (``--output-resolution``)."""
    if resolution_mm is None:
        return "the T1w's own grid (tensor resampled log-Euclidean, the other maps linearly)"
    return (
        f"an isotropic {resolution_mm:g} mm grid covering the T1w's field of view (tensor resampled "
        "log-Euclidean, the other maps linearly)"
    )


def detail_desc(weights_dir: str | None) -> str:
    """The methods text's sentence on the T1w detail transfer of the phase-1 weights ("" when they have none)."""
    detail = fa_detail_from(fa_detail_values(weights_dir))
    if detail is None:
        return ""
    return (
        "On that grid, FA was sharpened below the 2 mm model grid by a T1w detail transfer: the high-pass "
        f"(Gaussian sigma {detail.sigma_mm:g} mm) of FA looked up from the normalised T1w intensity (mean FA "
        f"per intensity bin of the training subjects), times {detail.weight:g}, was added to the predicted FA, "
        "and the tensor's eigenvalues were rescaled about their mean to match (MD and V1 unchanged). "
    )


def spaces_desc(config: RunConfig) -> str:
    """The methods text's sentences on the template registration, the template spaces and the
    parcellations ("" when only T1w was asked for)."""
    if not config.registered_templates:
        return ""
    from m2m_app.data.atlases import ATLASES
    from m2m_app.data.templates import TEMPLATES
    from m2m_app.maths.regions import RADIAL_SEARCH_MM
    from m2m_app.registration.normalize import REGISTRATION_MM

    names = ", ".join(config.registered_templates)
    sources = "; ".join(TEMPLATES[name]().source for name in config.registered_templates)
    text = (
        f"The T1w, brain-extracted with the predicted mask, was registered to {names} ({sources}) with ANTs "
        f"(antspyx; rigid, affine and SyN stages, Mattes mutual information, on {REGISTRATION_MM:g} mm grids, seeded). "
    )
    if config.template_spaces:
        text += (
            "In each template space, FA, MD, AD, RD and the uncertainty maps were resampled trilinearly through the "
            "composite transform, the tensor's components likewise and then reoriented by the finite-strain rotation "
            "of the warp's local Jacobian (Alexander et al. 2001), V1 and colour FA taken from the reoriented tensor, "
            "and the streamlines' points moved through the inverse transform. "
        )
    for name in config.atlases:
        atlas = ATLASES[name]()
        text += (
            f"The {atlas.source} ({atlas.citation}) was brought onto the maps' T1w grid through the inverse "
            "transform (nearest neighbour, inside the brain mask); per region, the volume and the mean and median "
            "FA, MD, AD and RD were tabulated, and each streamline's end points were assigned to the nearest "
            f"labelled voxel within {RADIAL_SEARCH_MM:g} mm (MRtrix3 tck2connectome's default radial search) to "
            "build symmetric connectomes of streamline count and of mean FA along the streamlines. "
        )
    return text


def init_ds_wf(
    subject: Subject, config: RunConfig, timings_file: Path | None = None, name: str = "ds_wf"
) -> LiterateWorkflow:
    """Write the unit's derivatives, its report and its QC JSON (see :mod:`m2m_app.io.derivatives`).

    ``timings_file`` is the stage-time JSON that
    :class:`~m2m_app.workflows.timing.StageTimer` keeps; it goes into the sidecars and the report.

    Inputs
    ------
    t1w, t1w_summary : the input T1w and its summary; grid : the T1w's model grid;
    :data:`PHASE1_INPUTS` (``diffusivity`` is the tensor) and :data:`PHASE2_INPUTS` unless
    phase 2 is skipped, all on the model grid (resampled onto the output grid as they are
    written); :data:`NERF_INPUTS` when phase 3 runs; boilerplate : the methods text shown in
    the report.

    Outputs
    -------
    maps, nerf : the written paths by key; qc : the QC JSON; report : ``sub-<label>.html``.
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = DS_DESC.format(
        output_grid_desc(config.output_resolution), ", BEP046 names for the tractogram" if config.runs_nerf else ""
    )
    for description in (detail_desc(config.weights_dir), spaces_desc(config)):
        if description:
            workflow.__desc__ = workflow.__desc__.rstrip("\n") + " " + description.rstrip() + "\n\n"
    fields = [
        "t1w",
        "t1w_summary",
        "boilerplate",
        "grid",
        *PHASE1_INPUTS,
        *(() if config.skip_phase2 else PHASE2_INPUTS),
        *(NERF_INPUTS if config.runs_nerf else ()),
    ]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["maps", "nerf", "qc", "report"]), name="outputnode")
    where = {
        "output_dir": str(config.output_dir),
        "participant": subject.participant,
        "session": subject.session or "",
        "weights_dir": config.weights_dir,
        "timings": str(timings_file or ""),
    }
    resolution = {"output_resolution": config.output_resolution}
    write_maps = pe.Node(
        WriteMaps(num_threads=config.omp_nthreads, **where, **resolution),
        name="write_maps",
        n_procs=config.omp_nthreads,
        mem_gb=2,
    )
    report = pe.Node(
        WriteReport(command_line=config.command_line, num_threads=config.omp_nthreads, **where, **resolution),
        name="write_report",
        n_procs=config.omp_nthreads,
        mem_gb=2,
    )
    maps = PHASE1_INPUTS + (() if config.skip_phase2 else PHASE2_INPUTS)
    workflow.connect(
        [
            (inputnode, write_maps, [("t1w", "t1w"), ("grid", "grid"), *((key, key) for key in maps)]),
            (
                inputnode,
                report,
                [("t1w", "t1w"), ("t1w_summary", "t1w_summary"), ("boilerplate", "boilerplate"), ("grid", "grid")],
            ),
            (write_maps, report, [("written", "maps")]),
            (write_maps, outputnode, [("written", "maps")]),
            (report, outputnode, [("qc", "qc"), ("report", "report")]),
        ]
    )
    write_nerf = pe.Node(WriteNerf(**where), name="write_nerf", mem_gb=1) if config.runs_nerf else None
    if config.registered_templates:
        _connect_template_spaces(workflow, config, where, inputnode, write_maps, write_nerf, report)
    if write_nerf is not None:
        workflow.connect(
            [
                (
                    inputnode,
                    write_nerf,
                    [
                        ("t1w", "t1w"),
                        ("field", "field"),
                        ("views", "views"),
                        ("turntable", "turntable"),
                        ("tractogram", "tractogram"),
                        ("sidecar", "tracking"),
                    ],
                ),
                (inputnode, report, [("report", "field_report")]),
                (write_nerf, report, [("written", "nerf")]),
                (write_nerf, outputnode, [("written", "nerf")]),
            ]
        )
    return workflow


def node_name(text: str) -> str:
    """``text`` as a Nipype node or workflow name: every character but letters and digits becomes ``_``."""
    return "".join(c if c.isalnum() else "_" for c in text)


def _connect_template_spaces(
    workflow, config: RunConfig, where: dict, inputnode, write_maps, write_nerf, report
) -> None:
    """One registration per template (on the T1w and the written brain mask), one writer per
    output space (template and resolution) and one per atlas, all before the report."""
    spaces = config.template_spaces
    registrations = {}
    for name in config.registered_templates:
        registrations[name] = pe.Node(
            RegisterToTemplate(template=name, random_seed=config.random_seed, num_threads=config.omp_nthreads),
            name=f"register_{node_name(name)}",
            n_procs=config.omp_nthreads,
            mem_gb=2,
        )
        workflow.connect(
            [
                (inputnode, registrations[name], [("t1w", "t1w")]),
                (write_maps, registrations[name], [(("written", _mask), "mask")]),
            ]
        )
    if config.atlases:
        _connect_atlases(workflow, config, where, inputnode, write_maps, write_nerf, report, registrations)
    if not spaces:
        return
    merge = pe.Node(niu.Merge(len(spaces)), name="merge_spaces")
    for index, space in enumerate(spaces, start=1):
        writer = pe.Node(
            WriteTemplateSpace(
                space=space.label,
                tractogram_format=config.tractogram_format,
                num_threads=config.omp_nthreads,
                **where,
            ),
            name=f"write_space_{node_name(space.label)}",
            n_procs=config.omp_nthreads,
            mem_gb=3,
        )
        workflow.connect(
            [
                (inputnode, writer, [("t1w", "t1w")]),
                (write_maps, writer, [("written", "maps")]),
                (registrations[space.name], writer, [("forward", "forward"), ("inverse", "inverse")]),
                (writer, merge, [("written", f"in{index}")]),
            ]
        )
        if write_nerf is not None:
            workflow.connect(write_nerf, "written", writer, "nerf")
    workflow.connect(merge, "out", report, "spaces")


def _connect_atlases(
    workflow, config: RunConfig, where: dict, inputnode, write_maps, write_nerf, report, registrations
) -> None:
    """One parcellation writer per atlas (its template's registration, the maps, the tractogram), before the report."""
    from m2m_app.data.atlases import ATLASES

    merge = pe.Node(niu.Merge(len(config.atlases)), name="merge_regions")
    for index, name in enumerate(config.atlases, start=1):
        registration = registrations[ATLASES[name]().template]
        writer = pe.Node(
            WriteRegions(atlas=name, num_threads=config.omp_nthreads, **where),
            name=f"write_regions_{node_name(name)}",
            n_procs=config.omp_nthreads,
            mem_gb=3,
        )
        workflow.connect(
            [
                (inputnode, writer, [("t1w", "t1w")]),
                (write_maps, writer, [("written", "maps")]),
                (registration, writer, [("forward", "forward"), ("inverse", "inverse")]),
                (writer, merge, [("regions", f"in{index}")]),
            ]
        )
        if write_nerf is not None:
            workflow.connect(write_nerf, "written", writer, "nerf")
    workflow.connect(merge, "out", report, "regions")


def _mask(written: dict) -> str:
    """The brain mask among WriteMaps' written paths."""
    return written["mask"]
