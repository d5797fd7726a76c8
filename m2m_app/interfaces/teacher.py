"""Nipype interface around :func:`m2m_app.teacher.prepare.prepare_subject`."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)


class _PrepareSubjectInputSpec(BaseInterfaceInputSpec):
    participant = Str(mandatory=True, desc="participant label, without 'sub-'")
    session = Str("", usedefault=True, desc="session label, without 'ses-' (empty: none)")
    t1w = File(exists=True, mandatory=True, desc="the T1w image")
    dwi = InputMultiObject(File(exists=True), mandatory=True, desc="DWI runs to concatenate")
    prep_dir = Directory(mandatory=True, desc="the prep (derivatives) folder to write into")
    random_seed = traits.Int(0, usedefault=True, desc="seed of the tractography")
    num_threads = traits.Int(1, usedefault=True, desc="threads of deepbet (torch) and ANTs (ITK)")
    source_link = Str("raw", usedefault=True, desc="the prep dir's DatasetLinks key of the BIDS dataset")
    dwi_source = traits.Enum(
        "raw",
        "qsiprep",
        usedefault=True,
        desc="raw: register the DWI to the T1w; qsiprep: QSIPrep's T1w and DWI share one space (identity)",
    )


class _PrepareSubjectOutputSpec(TraitedSpec):
    qc_file = File(exists=True, desc="the unit's QC JSON (its presence marks it finished)")
    tractogram_figure = File(exists=True, desc="the teacher's streamlines drawn as the app's report draws its own")


class PrepareSubject(SimpleInterface):
    """Fit, register and track one participant/session; write its training targets and QC figures."""

    input_spec = _PrepareSubjectInputSpec
    output_spec = _PrepareSubjectOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.manifest import qc_path
        from m2m_app.io.naming import Subject
        from m2m_app.io.tractogram import load_streamlines
        from m2m_app.reports.figures import streamline_figure
        from m2m_app.teacher.prepare import prepare_subject, tractogram_figure_path

        # ANTs reads its thread count from the environment; a MultiProc worker owns its own
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(self.inputs.num_threads)
        subject, prep_dir = Subject(self.inputs.participant, self.inputs.session or None), Path(self.inputs.prep_dir)
        qc = prepare_subject(
            subject,
            Path(self.inputs.t1w),
            [Path(p) for p in self.inputs.dwi],
            prep_dir,
            self.inputs.random_seed,
            self.inputs.num_threads,
            self.inputs.source_link,
            self.inputs.dwi_source,
        )
        self._results["tractogram_figure"] = str(
            streamline_figure(
                load_streamlines(prep_dir / qc["tractogram"], self.inputs.t1w),
                tractogram_figure_path(prep_dir, subject),
                title=f"{subject.label}: teacher (DWI) tractogram",
            )
        )
        self._results["qc_file"] = str(qc_path(prep_dir, subject))
        return runtime
