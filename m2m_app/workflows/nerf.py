"""Phase 3 as a sub-workflow: the NeRF field fitted to phase 2's maps, rendered and traced."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.nerf import FitField, RenderField, TrackField
from m2m_app.workflows.config import RunConfig

NERF_DESC = (
    "A neural field (learned feature grid and small MLP with positional encoding) was fitted to "
    "the predicted tractography slices along the three axes; it was volume-rendered (NeRF "
    "compositing) and traced with deterministic RK4 streamlines (m2m).\n\n"
)

#: Added to :data:`NERF_DESC` with ``--stop-dispersion`` (the threshold in degrees).
NERF_STOP_DESC = (
    "Streamlines were not seeded in, and stopped before entering, voxels where the V1 dispersion of the "
    "six inference passes exceeded {:g} degrees.\n\n"
)

#: What :func:`init_nerf_wf` puts out.
NERF_OUTPUTS = ("field", "report", "views", "turntable", "tractogram", "sidecar")


def init_nerf_wf(config: RunConfig, name: str = "nerf_wf") -> LiterateWorkflow:
    """Fit the field on the model grid, render its views and trace its streamlines.

    Inputs
    ------
    mask : phase 1's brain mask; v1_dispersion : phase 1's V1 dispersion (degrees; read only with
    ``--stop-dispersion``); tdi, dectdi : phase 2's maps (all on the model grid, as the field is);
    grid : the T1w's model grid (``ConformedGrid.to_dict``): with ``--output-resolution``, it
    gives the output grid, the tractogram's reference.

    Outputs
    -------
    field : the fitted field (safetensors); report : its fit report; views, turntable : rendered
    PNGs and GIF; tractogram : the streamlines (``--tractogram-format``); sidecar : their BEP046 metadata.
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = NERF_DESC
    if config.stop_dispersion_deg is not None:
        workflow.__desc__ += NERF_STOP_DESC.format(config.stop_dispersion_deg)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["mask", "tdi", "dectdi", "grid", "v1_dispersion"]), name="inputnode"
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=list(NERF_OUTPUTS)), name="outputnode")
    seed = {"random_seed": config.random_seed, "num_threads": config.omp_nthreads}
    fit = pe.Node(FitField(device=config.device, **seed), name="nerf_fit", n_procs=config.omp_nthreads)
    render = pe.Node(RenderField(num_threads=config.omp_nthreads), name="nerf_render", n_procs=config.omp_nthreads)
    track = pe.Node(
        TrackField(tractogram_format=config.tractogram_format, output_resolution=config.output_resolution, **seed),
        name="nerf_track",
        n_procs=config.omp_nthreads,
    )
    if config.stop_dispersion_deg is not None:
        track.inputs.max_dispersion_deg = config.stop_dispersion_deg
        workflow.connect(inputnode, "v1_dispersion", track, "v1_dispersion")
    workflow.connect(
        [
            (inputnode, fit, [(key, key) for key in ("mask", "tdi", "dectdi")]),
            (inputnode, track, [("grid", "grid")]),
            (fit, render, [("field", "field")]),
            (fit, track, [("field", "field"), ("mask", "mask")]),
            (fit, outputnode, [("field", "field"), ("report", "report")]),
            (render, outputnode, [("views", "views"), ("turntable", "turntable")]),
            (track, outputnode, [("tractogram", "tractogram"), ("sidecar", "sidecar")]),
        ]
    )
    return workflow
