"""Nipype interfaces around phases 1 and 2 (the translators) and the tensor maps."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, Str, TraitedSpec, traits


class _TorchInputSpec(BaseInterfaceInputSpec):
    weights_dir = traits.Either(
        None, Str, default=None, usedefault=True, desc="folder with <phase>.safetensors (None: packaged weights)"
    )
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


def _save(data: np.ndarray, affine: np.ndarray, name: str, dtype=np.float32) -> str:
    from m2m_app.io.nifti import save_nifti

    return str(save_nifti(data, affine, os.path.abspath(name), dtype=dtype))


class _CheckT1wInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="the T1w image")


class _CheckT1wOutputSpec(TraitedSpec):
    t1w = File(exists=True, desc="the same T1w, once it passed validation")
    summary = traits.Dict(desc="shape, zooms, orientation of the input")


class CheckT1w(SimpleInterface):
    """Validate the T1w (3D, readable, finite, non-empty) before any work starts."""

    input_spec = _CheckT1wInputSpec
    output_spec = _CheckT1wOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.nifti import load_t1w

        img, data = load_t1w(self.inputs.t1w)
        self._results["t1w"] = self.inputs.t1w
        self._results["summary"] = {
            "shape": list(data.shape),
            "zooms_mm": [round(float(z), 3) for z in img.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(img.affine)),
            "dtype": str(img.get_data_dtype()),
        }
        return runtime


class _PredictTensorInputSpec(_TorchInputSpec):
    t1w = File(exists=True, mandatory=True, desc="the validated T1w")


class _PredictTensorOutputSpec(TraitedSpec):
    tensor = File(exists=True, desc="(x, y, z, 6) tensor, mm²/s, world frame, on the model grid")
    mask = File(exists=True, desc="predicted brain mask on the model grid")
    fa_sd = File(exists=True, desc="FA standard deviation across the six passes, on the model grid")
    v1_dispersion = File(exists=True, desc="V1 angular dispersion across the six passes (degrees), on the model grid")
    grid = traits.Dict(desc="the T1w's model grid (ConformedGrid.to_dict), for the later phases and the outputs")


class PredictTensor(SimpleInterface):
    """Phase 1: the diffusion tensor predicted from the T1w (multi-view 2.5D translator), and its uncertainty.

    Everything stays on the model grid (the T1w is loaded and conformed once, here); the
    outputs are resampled onto the output grid only when they are written (:class:`WriteMaps`).
    """

    input_spec = _PredictTensorInputSpec
    output_spec = _PredictTensorOutputSpec

    def _run_interface(self, runtime):
        import torch

        from m2m_app.data.weights import uncertainty_scales
        from m2m_app.inference.predict import predict_phase1_model
        from m2m_app.io.nifti import load_t1w

        torch.set_num_threads(self.inputs.num_threads)
        img, data = load_t1w(self.inputs.t1w)
        out = predict_phase1_model(
            img,
            data,
            weights_dir=self.inputs.weights_dir,
            device=self.inputs.device,
            uncertainty=True,
            scales=uncertainty_scales("phase1", self.inputs.weights_dir),
        )
        affine = out["grid"].affine
        self._results["tensor"] = _save(out["tensor"], affine, "tensor.nii.gz")
        self._results["mask"] = _save(out["mask"], affine, "mask.nii.gz", np.uint8)
        for key in ("fa_sd", "v1_dispersion"):
            self._results[key] = _save(out[key], affine, f"{key}.nii.gz")
        self._results["grid"] = out["grid"].to_dict()
        return runtime


class _TensorMapsInputSpec(BaseInterfaceInputSpec):
    tensor = File(exists=True, mandatory=True, desc="(X, Y, Z, 6) tensor field")
    mask = File(exists=True, mandatory=True, desc="brain mask")


class _TensorMapsOutputSpec(TraitedSpec):
    fa = File(exists=True)
    md = File(exists=True)
    ad = File(exists=True)
    rd = File(exists=True)
    v1 = File(exists=True)
    colfa = File(exists=True)


class TensorMaps(SimpleInterface):
    """FA, MD, AD, RD, V1 and colour FA of a tensor field inside its mask, on the field's grid
    (the model grid in the pipeline; see :mod:`m2m_app.maths.tensor`)."""

    input_spec = _TensorMapsInputSpec
    output_spec = _TensorMapsOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.maths.tensor import masked_tensor_maps

        img = nib.load(self.inputs.tensor)
        tensor = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.mask).dataobj) > 0
        for key, volume in masked_tensor_maps(tensor, mask).items():
            self._results[key] = _save(volume, img.affine, f"{key}.nii.gz")
        return runtime


class _PredictTractsInputSpec(_TorchInputSpec):
    fa = File(exists=True, mandatory=True, desc="FA on the model grid (TensorMaps)")
    md = File(exists=True, mandatory=True, desc="MD on the model grid")
    colfa = File(exists=True, mandatory=True, desc="colour FA on the model grid")
    mask = File(exists=True, mandatory=True, desc="brain mask on the model grid")


class _PredictTractsOutputSpec(TraitedSpec):
    tdi = File(exists=True, desc="relative track density on the model grid")
    dectdi = File(exists=True, desc="directional track density (x, y, z, 3) on the model grid")
    tdi_sd = File(exists=True, desc="track-density standard deviation across the six passes, on the model grid")


class PredictTracts(SimpleInterface):
    """Phase 2: track density and direction predicted from the tensor maps, and the density's uncertainty."""

    input_spec = _PredictTractsInputSpec
    output_spec = _PredictTractsOutputSpec

    def _run_interface(self, runtime):
        import torch

        from m2m_app.data.weights import uncertainty_scales
        from m2m_app.inference.predict import predict_phase2
        from m2m_app.io.nifti import load_image

        torch.set_num_threads(self.inputs.num_threads)
        affine = load_image(self.inputs.fa)[0].affine
        maps = {key: load_image(getattr(self.inputs, key))[1] for key in ("fa", "md", "colfa", "mask")}
        out = predict_phase2(
            maps["fa"],
            maps["md"],
            maps["colfa"],
            None,
            mask=maps["mask"] > 0,
            weights_dir=self.inputs.weights_dir,
            device=self.inputs.device,
            uncertainty=True,
            scales=uncertainty_scales("phase2", self.inputs.weights_dir),
        )
        for key in ("tdi", "dectdi", "tdi_sd"):
            self._results[key] = _save(out[key], affine, f"{key}.nii.gz")
        return runtime
