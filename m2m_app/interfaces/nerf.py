"""Nipype interfaces around phase 3: the NeRF field, its rendered views and its streamlines."""

from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from m2m_app.interfaces.outputs import OutputGridInputSpec


class _FitFieldInputSpec(BaseInterfaceInputSpec):
    tdi = File(exists=True, mandatory=True, desc="phase 2's relative track density on the model grid")
    dectdi = File(exists=True, mandatory=True, desc="phase 2's directional track density on the model grid")
    mask = File(exists=True, mandatory=True, desc="phase 1's brain mask on the model grid")
    random_seed = traits.Int(0, usedefault=True)
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _FitFieldOutputSpec(TraitedSpec):
    field = File(exists=True, desc="the fitted field (safetensors with JSON metadata)")
    mask = File(exists=True, desc="the brain mask on the field's grid (the input mask)")
    report = traits.Dict(desc="fit report: PSNR (dB), steps, seconds")


class FitField(SimpleInterface):
    """Fit the continuous 3D field to the phase-2 slices, on the 2 mm model grid (phase 2's maps as they are)."""

    input_spec = _FitFieldInputSpec
    output_spec = _FitFieldOutputSpec

    def _run_interface(self, runtime):
        import torch

        from m2m_app.inference.predict import resolve_device
        from m2m_app.io.nifti import load_image
        from m2m_app.models.nerf import fit_field

        torch.set_num_threads(self.inputs.num_threads)
        tdi_img, tdi = load_image(self.inputs.tdi)
        mask = load_image(self.inputs.mask)[1] > 0
        field = fit_field(
            np.clip(tdi, 0, None),
            np.clip(load_image(self.inputs.dectdi)[1], 0, 1),
            mask,
            tdi_img.affine,
            seed=self.inputs.random_seed,
            device=str(resolve_device(self.inputs.device)),
        )
        self._results["field"] = str(field.save(os.path.abspath("field.safetensors")))
        self._results["mask"] = self.inputs.mask
        self._results["report"] = dict(field.info)
        return runtime


class _RenderFieldInputSpec(BaseInterfaceInputSpec):
    field = File(exists=True, mandatory=True)
    num_threads = traits.Int(1, usedefault=True)


class _RenderFieldOutputSpec(TraitedSpec):
    views = traits.List(File(exists=True), desc="left, right, top, front PNGs")
    turntable = File(exists=True, desc="animated GIF turning around the head")


class RenderField(SimpleInterface):
    """Volume-render the field: four standard views and a turntable animation."""

    input_spec = _RenderFieldInputSpec
    output_spec = _RenderFieldOutputSpec

    def _run_interface(self, runtime):
        import torch

        from m2m_app.models.nerf import FittedField
        from m2m_app.tractography.views import bake_field, write_standard_views, write_turntable

        torch.set_num_threads(self.inputs.num_threads)
        baked = bake_field(FittedField.load(self.inputs.field))
        views = write_standard_views(baked, os.getcwd())
        self._results["views"] = [str(views[k]) for k in sorted(views)]
        self._results["turntable"] = str(write_turntable(baked, os.path.abspath("turntable.gif")))
        return runtime


class _TrackFieldInputSpec(OutputGridInputSpec):  # the output grid is the tractogram's reference
    field = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True, desc="brain mask on the field's grid")
    v1_dispersion = File(exists=True, desc="phase 1's V1 dispersion (degrees) on the field's grid")
    max_dispersion_deg = traits.Float(
        requires=["v1_dispersion"], desc="stop where the V1 dispersion exceeds this (degrees); unset: off"
    )
    tractogram_format = traits.Enum("trx", "tck", "trk", usedefault=True)
    random_seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _TrackFieldOutputSpec(TraitedSpec):
    tractogram = File(exists=True)
    sidecar = traits.Dict(desc="BEP046 tractography metadata")


class TrackField(SimpleInterface):
    """Deterministic RK4 streamlines through the field, written in RASMM with the output grid as
    reference (the T1w's own grid, or that of ``--output-resolution``: the grid of the written maps,
    so that dipy and TrackVis accept those maps as the tractogram's reference); with
    ``max_dispersion_deg``, not into voxels whose V1 dispersion exceeds it."""

    input_spec = _TrackFieldInputSpec
    output_spec = _TrackFieldOutputSpec

    def _run_interface(self, runtime):
        import torch

        from m2m_app.io.nifti import grid_header, load_image
        from m2m_app.io.tractogram import save_tractogram
        from m2m_app.maths.grid import ConformedGrid
        from m2m_app.models.nerf import FittedField
        from m2m_app.tractography.streamlines import TrackingSettings, bep046_sidecar, track_field

        torch.set_num_threads(self.inputs.num_threads)
        field = FittedField.load(self.inputs.field)
        mask_img, mask = load_image(self.inputs.mask)
        max_dispersion = self.inputs.max_dispersion_deg if isdefined(self.inputs.max_dispersion_deg) else None
        settings = TrackingSettings(max_dispersion_deg=max_dispersion)
        dispersion = None if max_dispersion is None else load_image(self.inputs.v1_dispersion)[1]
        streamlines = track_field(
            field, mask > 0, mask_img.affine, settings, dispersion=dispersion, seed=self.inputs.random_seed
        )
        path = os.path.abspath(f"tractogram.{self.inputs.tractogram_format}")
        reference = grid_header(*ConformedGrid.from_dict(self.inputs.grid).output_grid(self.inputs.output_resolution))
        self._results["tractogram"] = str(save_tractogram(streamlines, reference, path))
        self._results["sidecar"] = json.loads(
            json.dumps(bep046_sidecar(settings, n_streamlines=len(streamlines)), default=str)
        )
        return runtime
