"""Nipype interface writing a subject's derivatives and report into the output folder."""
from __future__ import annotations

from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface, Str,
                                    TraitedSpec, isdefined, traits)

MAP_KEYS = ("fa", "md", "ad", "rd", "v1", "colfa", "mask", "tdi", "dectdi")


class _WriteSubjectInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    participant = Str(mandatory=True)
    session = Str("", usedefault=True)
    t1w = File(exists=True, mandatory=True)
    t1w_summary = traits.Dict(desc="from CheckT1w")
    diffusivity = File(exists=True, mandatory=True, desc="the predicted tensor")
    fa = File(exists=True, mandatory=True)
    md = File(exists=True, mandatory=True)
    ad = File(exists=True, mandatory=True)
    rd = File(exists=True, mandatory=True)
    v1 = File(exists=True, mandatory=True)
    colfa = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    tdi = File(exists=True, desc="phase 2 (absent with --skip-phase2)")
    dectdi = File(exists=True)
    tractogram = File(exists=True, desc="phase 3 (absent with --skip-nerf)")
    tracking = traits.Dict()
    field = File(exists=True)
    field_report = traits.Dict()
    views = traits.List(File(exists=True))
    turntable = File(exists=True)
    weights_dir = traits.Either(None, Str, default=None, usedefault=True)
    boilerplate = Str("", usedefault=True)


class _WriteSubjectOutputSpec(TraitedSpec):
    qc = File(exists=True, desc="the subject's QC JSON (written last: marks completion)")
    report = File(exists=True)


class WriteSubject(SimpleInterface):
    """Write maps, tractogram, field and figures with BIDS names and sidecars, then the HTML report."""

    input_spec = _WriteSubjectInputSpec
    output_spec = _WriteSubjectOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        from m2m_app.io.derivatives import write_subject
        from m2m_app.io.naming import Subject
        from m2m_app.reports.subject import write_report

        inputs = self.inputs
        subject = Subject(inputs.participant, inputs.session or None)
        maps = {key: getattr(inputs, key) for key in (*MAP_KEYS, "diffusivity")
                if isdefined(getattr(inputs, key))}
        optional = {name: getattr(inputs, name) if isdefined(getattr(inputs, name)) else None
                    for name in ("tractogram", "field", "turntable")}
        figures = {Path(v).stem: v for v in (inputs.views if isdefined(inputs.views) else [])}
        if optional["turntable"]:
            figures["turntable"] = optional["turntable"]
        written = write_subject(Path(inputs.output_dir), subject, inputs.t1w, maps, optional["tractogram"],
                                inputs.tracking if isdefined(inputs.tracking) else {}, optional["field"],
                                figures, inputs.weights_dir,
                                inputs.field_report if isdefined(inputs.field_report) else {})
        summary = {"input T1w": inputs.t1w, **(inputs.t1w_summary if isdefined(inputs.t1w_summary) else {})}
        self._results["qc"] = str(written["qc"])
        self._results["report"] = str(write_report(Path(inputs.output_dir), subject, inputs.t1w, written,
                                                   summary, inputs.boilerplate, []))
        return runtime
