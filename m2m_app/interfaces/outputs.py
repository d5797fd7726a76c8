"""Nipype interfaces writing a subject's derivatives and report into the output folder.

Maps, phase-3 outputs and the report are three nodes, so that a failure in phase 3 does
not keep the tensor maps from reaching the output folder.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

MAP_KEYS = (
    "fa",
    "md",
    "ad",
    "rd",
    "v1",
    "colfa",
    "mask",
    "tdi",
    "dectdi",
    "diffusivity",
    "fa_sd",
    "v1_dispersion",
    "tdi_sd",
)


class SubjectInputSpec(BaseInterfaceInputSpec):
    """The inputs naming one unit's output folder, its T1w, the weights and the stage times."""

    output_dir = Directory(mandatory=True)
    participant = Str(mandatory=True)
    session = Str("", usedefault=True)
    t1w = File(exists=True, mandatory=True)
    weights_dir = traits.Either(None, Str, default=None, usedefault=True)
    timings = Str("", usedefault=True, desc="stage wall-time JSON kept by StageTimer ('' for none)")


class OutputGridInputSpec(BaseInterfaceInputSpec):
    """The inputs naming the grid outputs are written on (``ConformedGrid.output_grid``)."""

    grid = traits.Dict(mandatory=True, desc="the T1w's model grid (ConformedGrid.to_dict), from PredictTensor")
    output_resolution = traits.Either(
        None, traits.Float, default=None, usedefault=True, desc="voxel size (mm) of the outputs (None: the T1w's grid)"
    )


class _OutputGridInputSpec(SubjectInputSpec, OutputGridInputSpec):
    pass


def unit_of(inputs):
    """The :class:`~m2m_app.io.naming.Subject` of a :class:`SubjectInputSpec`'s inputs."""
    from m2m_app.io.naming import Subject

    return Subject(inputs.participant, inputs.session or None)


def _timings(inputs) -> dict[str, float]:
    from m2m_app.io.timings import read_timings

    return read_timings(inputs.timings)


class _WrittenOutputSpec(TraitedSpec):
    written = traits.Dict(Str, Str, desc="written derivative paths by key")


class _WriteMapsInputSpec(_OutputGridInputSpec):
    diffusivity = File(exists=True, mandatory=True, desc="the predicted tensor (all maps on the model grid)")
    fa = File(exists=True, mandatory=True)
    md = File(exists=True, mandatory=True)
    ad = File(exists=True, mandatory=True)
    rd = File(exists=True, mandatory=True)
    v1 = File(exists=True, mandatory=True)
    colfa = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    tdi = File(exists=True, desc="phase 2 (absent with --skip-phase2)")
    dectdi = File(exists=True)
    fa_sd = File(exists=True, desc="phase-1 uncertainty: FA standard deviation across the passes")
    v1_dispersion = File(exists=True, desc="phase-1 uncertainty: V1 angular dispersion across the passes")
    tdi_sd = File(exists=True, desc="phase-2 uncertainty: track-density standard deviation across the passes")
    num_threads = traits.Int(1, usedefault=True, desc="threads of the resampling onto the output grid")


class WriteMaps(SimpleInterface):
    """Write the tensor maps, mask, track-density maps and their uncertainty maps with BIDS names and sidecars.

    The model-grid maps are resampled onto the output grid here, once each (see
    :func:`~m2m_app.maths.grid.resample_outputs` for how each map is resampled).
    """

    input_spec = _WriteMapsInputSpec
    output_spec = _WrittenOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.derivatives import write_maps
        from m2m_app.maths.grid import ConformedGrid

        maps = {key: getattr(self.inputs, key) for key in MAP_KEYS if isdefined(getattr(self.inputs, key))}
        written = write_maps(
            Path(self.inputs.output_dir),
            unit_of(self.inputs),
            self.inputs.t1w,
            maps,
            self.inputs.weights_dir,
            _timings(self.inputs),
            grid=ConformedGrid.from_dict(self.inputs.grid),
            resolution_mm=self.inputs.output_resolution,
            threads=self.inputs.num_threads,
        )
        self._results["written"] = {k: str(v) for k, v in written.items()}
        return runtime


class _WriteNerfInputSpec(SubjectInputSpec):
    tractogram = File(exists=True, mandatory=True)
    tracking = traits.Dict(mandatory=True, desc="BEP046 sidecar of the tractogram")
    field = File(exists=True, mandatory=True)
    views = traits.List(File(exists=True), mandatory=True)
    turntable = File(exists=True, mandatory=True)


class WriteNerf(SimpleInterface):
    """Write the tractogram, the fitted field and the rendered views."""

    input_spec = _WriteNerfInputSpec
    output_spec = _WrittenOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.derivatives import write_nerf

        figures = {Path(v).stem: v for v in self.inputs.views} | {"turntable": self.inputs.turntable}
        written = write_nerf(
            Path(self.inputs.output_dir),
            unit_of(self.inputs),
            self.inputs.t1w,
            self.inputs.tractogram,
            self.inputs.tracking,
            self.inputs.field,
            figures,
            self.inputs.weights_dir,
            _timings(self.inputs),
        )
        self._results["written"] = {k: str(v) for k, v in written.items()}
        return runtime


class _WriteReportInputSpec(_OutputGridInputSpec):
    maps = traits.Dict(Str, Str, mandatory=True, desc="from WriteMaps")
    nerf = traits.Dict(Str, Str, desc="from WriteNerf (absent when phase 3 is skipped)")
    field_report = traits.Dict(desc="NeRF fit report")
    t1w_summary = traits.Dict(desc="from CheckT1w")
    boilerplate = Str("", usedefault=True)
    command_line = Str("", usedefault=True, desc="the m2m command line, for the report's About section")
    spaces = traits.List(traits.Dict, desc="from WriteTemplateSpace, one per template space")
    regions = traits.List(traits.Dict, desc="from WriteRegions, one per atlas")
    num_threads = traits.Int(1, usedefault=True, desc="threads resampling the viewer's volumes")


class _WriteReportOutputSpec(TraitedSpec):
    qc = File(exists=True, desc="the subject's QC JSON (written last: marks completion)")
    report = File(exists=True)


class WriteReport(SimpleInterface):
    """Write ``sub-<label>.html`` and, last, the subject's QC JSON.

    With ``output_resolution`` the figures' T1w underlay is the T1w resampled (linearly) onto
    the output grid, so that it lies under the written maps voxel for voxel.
    """

    input_spec = _WriteReportInputSpec
    output_spec = _WriteReportOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.derivatives import qc_path, subject_qc
        from m2m_app.io.files import save_json
        from m2m_app.io.nifti import load_t1w, save_nifti
        from m2m_app.maths.grid import ConformedGrid, resample_scalar
        from m2m_app.reports.subject import report_summary, write_report

        inputs, subject = self.inputs, unit_of(self.inputs)
        written = {k: Path(v) for k, v in {**inputs.maps, **(inputs.nerf if isdefined(inputs.nerf) else {})}.items()}
        field_report = inputs.field_report if isdefined(inputs.field_report) else {}
        qc = subject_qc(subject, written, field_report)
        spaces = list(inputs.spaces) if isdefined(inputs.spaces) else []
        for space in spaces:
            qc |= {f"{space['space']}_{key}": value for key, value in space["qc"].items()}
        regions = list(inputs.regions) if isdefined(inputs.regions) else []
        for entry in regions:
            found = entry["summary"]
            qc[f"{entry['atlas']}_regions_found"] = found["regions_found"]
            if "streamlines" in found:
                qc[f"{entry['atlas']}_assigned_fraction"] = round(found["assigned"] / max(found["streamlines"], 1), 4)
        summary = {
            "input T1w": inputs.t1w,
            **(inputs.t1w_summary if isdefined(inputs.t1w_summary) else {}),
            **report_summary(written, qc["n_streamlines"], field_report, inputs.weights_dir),
        }
        underlay = inputs.t1w
        if inputs.output_resolution is not None:
            shape, affine = ConformedGrid.from_dict(inputs.grid).output_grid(inputs.output_resolution)
            img, data = load_t1w(inputs.t1w)
            resampled = resample_scalar(data, img.affine, affine, shape)
            underlay = str(save_nifti(resampled, affine, Path("t1w_output_grid.nii.gz").absolute()))
        self._results["report"] = str(
            write_report(
                Path(inputs.output_dir),
                subject,
                underlay,
                written,
                summary,
                inputs.boilerplate,
                [],
                _timings(inputs),
                command_line=inputs.command_line,
                weights_dir=inputs.weights_dir,
                spaces=spaces,
                regions=regions,
                threads=inputs.num_threads,
            )
        )
        self._results["qc"] = str(save_json(qc, qc_path(Path(inputs.output_dir), subject)))
        return runtime
