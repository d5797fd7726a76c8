"""Phases 1 and 2 as sub-workflows: the translators and the tensor maps between them."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from m2m_app.interfaces.translators import PredictTensor, PredictTracts, TensorMaps
from m2m_app.workflows.config import RunConfig

#: The tensor maps of :class:`TensorMaps`, in the order they are written.
TENSOR_MAPS = ("fa", "md", "ad", "rd", "v1", "colfa")

PHASE1_DESC = (
    "Diffusion tensors were predicted from the T1w image by m2m's phase-1 translator: the T1w "
    "was reoriented to RAS, resampled to a 2 mm grid and intensity-normalised; a 2.5D U-Net "
    "generator (trained adversarially with global and PatchGAN discriminators) predicted the "
    "log-Euclidean tensor and a brain mask on axial, coronal and sagittal slices of the T1w and "
    "of its left-right mirror image; the six predictions were fused (log-Euclidean mean orientation "
    "with the views' mean eigenvalues, which keeps their anisotropy). FA, MD, AD, RD, the principal "
    "eigenvector and colour FA were computed from the predicted tensor on the 2 mm grid.\n\n"
)
PHASE2_DESC = (
    "A second translator of the same design predicted a track-density image and a directionally "
    "encoded track density from the predicted FA, MD and colour FA.\n\n"
)


def _torch_args(config: RunConfig) -> dict:
    return {"weights_dir": config.weights_dir, "device": config.device, "num_threads": config.omp_nthreads}


def init_phase1_wf(config: RunConfig, name: str = "phase1_wf") -> LiterateWorkflow:
    """Phase 1: the tensor, brain mask and their uncertainty from the T1w, then the tensor maps.

    Inputs
    ------
    t1w : the validated T1w.

    Outputs
    -------
    tensor : ``(x, y, z, 6)`` tensor (mm²/s); mask : predicted brain mask; fa_sd, v1_dispersion :
    uncertainty maps; fa, md, ad, rd, v1, colfa : tensor maps; all on the model grid;
    grid : the T1w's model grid (``ConformedGrid.to_dict``), conformed once here for the later
    phases and the outputs.
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = PHASE1_DESC
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["tensor", "mask", "fa_sd", "v1_dispersion", "grid", *TENSOR_MAPS]),
        name="outputnode",
    )
    phase1 = pe.Node(PredictTensor(**_torch_args(config)), name="phase1", n_procs=config.omp_nthreads, mem_gb=3)
    maps = pe.Node(TensorMaps(), name="tensor_maps", mem_gb=3)
    workflow.connect(
        [
            (inputnode, phase1, [("t1w", "t1w")]),
            (phase1, maps, [("tensor", "tensor"), ("mask", "mask")]),
            (phase1, outputnode, [(key, key) for key in ("tensor", "mask", "fa_sd", "v1_dispersion", "grid")]),
            (maps, outputnode, [(key, key) for key in TENSOR_MAPS]),
        ]
    )
    return workflow


def init_phase2_wf(config: RunConfig, name: str = "phase2_wf") -> LiterateWorkflow:
    """Phase 2: track density, its direction and its uncertainty from the tensor maps.

    Inputs
    ------
    mask, fa, md, colfa : phase 1's maps, on the model grid (taken as they are).

    Outputs
    -------
    tdi : relative track density; dectdi : ``(x, y, z, 3)`` directional density; tdi_sd : its
    standard deviation across the passes; all on the model grid.
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = PHASE2_DESC
    inputnode = pe.Node(niu.IdentityInterface(fields=["mask", "fa", "md", "colfa"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["tdi", "dectdi", "tdi_sd"]), name="outputnode")
    phase2 = pe.Node(PredictTracts(**_torch_args(config)), name="phase2", n_procs=config.omp_nthreads, mem_gb=3)
    workflow.connect(
        [
            (inputnode, phase2, [(key, key) for key in ("mask", "fa", "md", "colfa")]),
            (phase2, outputnode, [(key, key) for key in ("tdi", "dectdi", "tdi_sd")]),
        ]
    )
    return workflow
