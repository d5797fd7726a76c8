"""Nipype interfaces of the template spaces: the registration, the template-space writer, the parcellation
writer, and the teacher's parcellation (``m2m-train prepare``)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, Str, TraitedSpec, isdefined, traits

from m2m_app.interfaces.outputs import SubjectInputSpec, unit_of


class _RegisterInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="the input T1w")
    mask = File(exists=True, mandatory=True, desc="m2m's brain mask in T1w space (any grid over the T1w)")
    template = Str(mandatory=True, desc="template name, e.g. MNI152NLin2009aSym")
    random_seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _RegisterOutputSpec(TraitedSpec):
    forward = File(exists=True, desc="composite transform from-T1w_to-<template>, mode image (.h5)")
    inverse = File(exists=True, desc="composite transform from-<template>_to-T1w, mode image (.h5)")


class RegisterToTemplate(SimpleInterface):
    """Register the brain-extracted T1w to a template (antspyx SyNRA; see :mod:`m2m_app.registration.normalize`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.data.templates import TEMPLATES
        from m2m_app.registration.normalize import register_t1w

        forward = Path(runtime.cwd) / f"from-T1w_to-{self.inputs.template}_mode-image_xfm.h5"
        inverse = Path(runtime.cwd) / f"from-{self.inputs.template}_to-T1w_mode-image_xfm.h5"
        register_t1w(
            Path(self.inputs.t1w),
            Path(self.inputs.mask),
            TEMPLATES[self.inputs.template](),
            forward,
            inverse,
            self.inputs.random_seed,
            self.inputs.num_threads,
        )
        self._results["forward"], self._results["inverse"] = str(forward), str(inverse)
        return runtime


def copy_transforms(inputs, template: str) -> dict[str, Path]:
    """Copy the registration's ``forward`` and ``inverse`` transforms (work folder) to their
    derivative names in ``inputs.output_dir`` (atomically; the same bytes on a re-run)."""
    from m2m_app.io.files import copy_file
    from m2m_app.registration.template_space import transform_paths

    transforms = transform_paths(Path(inputs.output_dir), unit_of(inputs), template)
    for key, source in (("forward", inputs.forward), ("inverse", inputs.inverse)):
        copy_file(source, transforms[key])
    return transforms


class _RegisteredUnitInputSpec(SubjectInputSpec):
    """A unit's T1w-space derivatives and its registration to a template."""

    maps = traits.Dict(Str, Str, mandatory=True, desc="T1w-space derivatives by key, from WriteMaps")
    nerf = traits.Dict(Str, Str, desc="from WriteNerf (the tractogram; absent when phase 3 is skipped)")
    forward = File(exists=True, mandatory=True, desc="from-T1w_to-<template> transform")
    inverse = File(exists=True, mandatory=True, desc="from-<template>_to-T1w transform")
    num_threads = traits.Int(1, usedefault=True)


def _written(inputs) -> dict[str, Path]:
    """The unit's T1w-space files by key: the maps, and the tractogram when phase 3 ran."""
    written = {key: Path(path) for key, path in inputs.maps.items()}
    if isdefined(inputs.nerf) and "tractogram" in inputs.nerf:
        written["tractogram"] = Path(inputs.nerf["tractogram"])
    return written


class _WriteSpaceInputSpec(_RegisteredUnitInputSpec):
    space = Str(mandatory=True, desc="output space label, e.g. MNI152NLin2009aSym:res-2")
    tractogram_format = traits.Enum("trx", "tck", "trk", usedefault=True)


class _WriteSpaceOutputSpec(TraitedSpec):
    written = traits.Dict(desc="{'space': label, 'written': {key: path}, 'qc': {dice, correlation, flagged}}")


class WriteTemplateSpace(SimpleInterface):
    """Copy the transforms into the output folder and write the unit's derivatives in one template space."""

    input_spec = _WriteSpaceInputSpec
    output_spec = _WriteSpaceOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.data.templates import parse_output_spaces
        from m2m_app.registration.template_space import write_template_space

        inputs, subject = self.inputs, unit_of(self.inputs)
        (space,) = parse_output_spaces([inputs.space])
        output_dir = Path(inputs.output_dir)
        transforms = copy_transforms(inputs, space.name)
        paths, qc = write_template_space(
            output_dir,
            subject,
            space,
            Path(inputs.t1w),
            _written(inputs),
            transforms,
            inputs.tractogram_format,
            inputs.num_threads,
        )
        self._results["written"] = {
            "space": space.label,
            "written": {key: str(path) for key, path in (paths | transforms).items()},
            "qc": qc,
        }
        return runtime


class _WriteRegionsInputSpec(_RegisteredUnitInputSpec):
    atlas = Str(mandatory=True, desc="atlas name, e.g. DesikanKilliany")


class _WriteRegionsOutputSpec(TraitedSpec):
    regions = traits.Dict(desc="{'atlas': name, 'written': {key: path}, 'summary': {regions_found, assigned, ...}}")


class WriteRegions(SimpleInterface):
    """Write the unit's parcellation, region table and connectomes for one atlas (see
    :mod:`m2m_app.registration.parcellation`), with the transforms they came through."""

    input_spec = _WriteRegionsInputSpec
    output_spec = _WriteRegionsOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.data.atlases import ATLASES
        from m2m_app.registration.parcellation import write_regions

        inputs = self.inputs
        atlas = ATLASES[inputs.atlas]()
        transforms = copy_transforms(inputs, atlas.template)
        paths, summary = write_regions(
            Path(inputs.output_dir),
            unit_of(inputs),
            atlas,
            _written(inputs),
            transforms["inverse"],
            "nerf",
            threads=inputs.num_threads,
        )
        self._results["regions"] = {
            "atlas": atlas.name,
            "written": {key: str(path) for key, path in (paths | transforms).items()},
            "summary": summary,
        }
        return runtime


class _TeacherRegionsInputSpec(BaseInterfaceInputSpec):
    participant = Str(mandatory=True, desc="participant label, without 'sub-'")
    session = Str("", usedefault=True, desc="session label, without 'ses-' (empty: none)")
    t1w = File(exists=True, mandatory=True, desc="the T1w image")
    prep_dir = Str(mandatory=True, desc="the prep folder the teacher wrote the unit's targets into")
    qc_file = File(exists=True, mandatory=True, desc="the unit's QC JSON (the teacher's targets are written)")
    atlases = traits.List(Str, mandatory=True, desc="the atlases' names (m2m_app.data.atlases.ATLASES)")
    random_seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _TeacherRegionsOutputSpec(TraitedSpec):
    summaries = traits.Dict(desc="{atlas: {regions_found, streamlines, assigned, ...}}")


class TeacherRegions(SimpleInterface):
    """The teacher's parcellation, region table and connectome of one unit, for each atlas
    (:func:`m2m_app.registration.parcellation.write_teacher_regions`)."""

    input_spec = _TeacherRegionsInputSpec
    output_spec = _TeacherRegionsOutputSpec

    def _run_interface(self, runtime):
        from m2m_app.io.naming import Subject
        from m2m_app.registration.parcellation import write_teacher_regions

        inputs = self.inputs
        self._results["summaries"] = write_teacher_regions(
            Path(inputs.prep_dir),
            Subject(inputs.participant, inputs.session or None),
            Path(inputs.t1w),
            inputs.atlases,
            inputs.random_seed,
            inputs.num_threads,
        )
        return runtime
