"""A parcellation on the subject's T1w grid, its region table, and the structural connectome.

The atlas (:mod:`m2m_app.data.atlases`, in a template space) is brought to the grid of the
unit's T1w-space maps through the inverse template transform (``from-<template>_to-T1w``):
every voxel of the brain mask takes the atlas label found, nearest neighbour, where the
transform sends it (ANTs' own mapping, via :func:`~m2m_app.registration.normalize.coordinate_field`),
voxels outside the mask are 0. On that grid:

- the region table: volume, mean and median FA, MD, AD, RD, and the mean FA uncertainty when
  the unit has one (:mod:`m2m_app.maths.regions`);
- the connectome: each streamline's two end points assigned to regions by MRtrix3's default rule
  (radial search, :data:`~m2m_app.maths.regions.RADIAL_SEARCH_MM`), symmetric matrices of the
  streamline count and of the mean FA along the streamlines (FA sampled trilinearly at every
  point, averaged per streamline, then per edge), in XCP-D's ``_relmat.tsv`` layout (a ``Node``
  column, then one column per node, nodes in the order of the ``_dseg.tsv``).

The same code writes the app's files (``OUTPUT_DIR``) and the teacher's (``PREP_DIR``,
:func:`write_teacher_regions`: the teacher's own registration, brain mask, tensor maps and
tractogram), so that ``m2m-train evaluate-tractogram`` can score m2m's against the diffusion data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes

from m2m_app import __version__
from m2m_app.data.atlases import ATLASES, Atlas
from m2m_app.data.templates import TEMPLATES
from m2m_app.io.files import copy_file, save_bytes, save_json, save_tsv
from m2m_app.io.naming import Subject, derivative_path, derivative_paths, sidecar_path
from m2m_app.io.nifti import load_image, save_nifti
from m2m_app.io.tractogram import load_streamlines
from m2m_app.maths.grid import isotropic_grid
from m2m_app.maths.regions import (
    RADIAL_SEARCH_MM,
    assign_end_points,
    connectome,
    region_means,
    region_medians,
    region_volumes,
    streamline_means,
)
from m2m_app.maths.warp import sample
from m2m_app.registration.normalize import REGISTRATION_MM, coordinate_field, register_t1w
from m2m_app.registration.template_space import transform_paths
from m2m_app.teacher.prepare import teacher_paths

LOGGER = logging.getLogger(__name__)

#: The maps of the region table: key of the written maps → (column prefix, description, units).
REGION_MAPS: dict[str, tuple[str, str, str]] = {
    "fa": ("fa", "fractional anisotropy", "arbitrary"),
    "md": ("md", "mean diffusivity", "mm^2/s"),
    "ad": ("ad", "axial diffusivity", "mm^2/s"),
    "rd": ("rd", "radial diffusivity", "mm^2/s"),
}
#: The end-point rule, as the sidecars state it.
ASSIGNMENT = (
    f"radial search (MRtrix3 tck2connectome's default): each end point is assigned to the region of the "
    f"nearest labelled voxel centre within {RADIAL_SEARCH_MM:g} mm, else to none; streamlines with an "
    "unassigned end are left out"
)


def region_paths(root: Path, subject: Subject, atlas: str, track_method: str) -> dict[str, Path]:
    """The files of one unit and one atlas: ``dseg`` (image), ``labels`` (its ``_dseg.tsv``),
    ``regions`` (the region table), ``count`` and ``mean_fa`` (the connectomes), ``figure``."""
    seg = {"space": "T1w", "seg": atlas}
    relmat = {**seg, "track": track_method}
    return {
        "dseg": derivative_path(root, subject, "anat", "dseg", **seg),
        "labels": derivative_path(root, subject, "anat", "dseg", ".tsv", **seg),
        "regions": derivative_path(root, subject, "dwi", "dwimap", ".tsv", **seg, model="tensor"),
        "count": derivative_path(root, subject, "dwi", "relmat", ".tsv", **relmat, stat="count"),
        "mean_fa": derivative_path(root, subject, "dwi", "relmat", ".tsv", **relmat, stat="meanFA"),
        "figure": derivative_path(root, subject, "figures", "relmat", ".svg", **relmat, stat="count"),
    }


def parcellate(atlas: Atlas, inverse: Path, mask_affine: np.ndarray, mask: np.ndarray, threads: int = 1) -> np.ndarray:
    """The atlas's labels on the mask's grid ``(X, Y, Z)`` int16 (voxel → mm ``mask_affine``), 0
    outside ``mask``: nearest neighbour where ``inverse`` (``from-<template>_to-T1w``, ANTs image
    convention) sends each voxel. The field is computed on a :data:`REGISTRATION_MM` grid (where the
    warp lives) and interpolated trilinearly, as the template-space writer does."""
    atlas_img, atlas_labels = load_image(atlas.image)
    shape, affine = isotropic_grid(mask.shape, mask_affine, REGISTRATION_MM)
    field = coordinate_field(inverse, shape, affine, atlas_img.shape, atlas_img.affine, threads)
    inside = np.argwhere(mask)
    template_points = sample(field, affine, apply_affine(mask_affine, inside), threads=threads)
    labels = np.zeros(mask.shape, dtype=np.int16)
    labels[tuple(inside.T)] = np.rint(sample(atlas_labels, atlas_img.affine, template_points, order=0, threads=threads))
    return labels


def region_table(labels: np.ndarray, affine: np.ndarray, atlas: Atlas, maps: dict[str, np.ndarray]) -> list[dict]:
    """One row per region of the atlas: index, name, hemisphere, structure, volume (mm³), the mean
    and median of every map of :data:`REGION_MAPS` in ``maps`` (same grid as ``labels``), and the mean
    of ``maps["fa_sd"]`` when given. Empty regions have NaN statistics (``n/a`` in the TSV)."""
    regions = atlas.regions()
    indices = np.array([region.index for region in regions])
    columns: dict[str, np.ndarray] = {
        "volume_mm3": region_volumes(labels, indices, float(np.prod(voxel_sizes(affine))))
    }
    for key, (prefix, _, _) in REGION_MAPS.items():
        if key in maps:
            columns[f"{prefix}_mean"] = region_means(maps[key], labels, indices)
            columns[f"{prefix}_median"] = region_medians(maps[key], labels, indices)
    if "fa_sd" in maps:
        columns["fa_sd_mean"] = region_means(maps["fa_sd"], labels, indices)
    return [
        {
            "index": region.index,
            "name": region.name,
            "hemisphere": region.hemisphere,
            "structure": region.structure,
            **{key: float(f"{values[i]:.6g}") for key, values in columns.items()},
        }
        for i, region in enumerate(regions)
    ]


def region_table_sidecar() -> dict:
    """The region table's column descriptions (BIDS tabular-file sidecar)."""
    columns = {
        "index": {"Description": "the region's integer label in the _dseg image"},
        "name": {"Description": "region name (hemisphere prefix L_ / R_; none for bilateral regions)"},
        "hemisphere": {"Description": "L, R or B (bilateral)"},
        "structure": {"Description": "cortex or subcortex/brainstem"},
        "volume_mm3": {"Description": "volume of the region inside the brain mask", "Units": "mm^3"},
    }
    for prefix, description, units in REGION_MAPS.values():
        for stat in ("mean", "median"):
            columns[f"{prefix}_{stat}"] = {"Description": f"{stat} {description} over the region", "Units": units}
    columns["fa_sd_mean"] = {
        "Description": "mean FA uncertainty (the _desc-sd FA map: spread of the six phase-1 passes) over the region; "
        "absent for the teacher",
        "Units": "arbitrary",
    }
    return columns


def tractogram_connectome(
    streamlines: list[np.ndarray], labels: np.ndarray, affine: np.ndarray, fa: np.ndarray, atlas: Atlas
) -> tuple[np.ndarray, np.ndarray, int]:
    """The count and mean-FA matrices ``(R, R)`` over the atlas's regions (see the module text), and
    the number of streamlines with both ends assigned. ``streamlines``: world mm; ``fa`` on the
    grid of ``labels``."""
    indices = np.array([region.index for region in atlas.regions()])
    kept = [s for s in streamlines if len(s)]
    if not kept:
        empty = np.zeros((len(indices), len(indices)))
        return empty, np.full_like(empty, np.nan), 0
    first = assign_end_points(np.array([s[0] for s in kept]), labels, affine)
    last = assign_end_points(np.array([s[-1] for s in kept]), labels, affine)
    along = streamline_means(kept, sample(fa, affine, np.concatenate(kept)))
    counts, mean_fa = connectome(first, last, indices, along)
    return counts, mean_fa, int(np.count_nonzero((first > 0) & (last > 0)))


def _relmat_rows(matrix: np.ndarray, names: list[str], integer: bool) -> list[dict]:
    return [
        {"Node": name, **{other: (int(v) if integer else float(f"{v:.6g}")) for other, v in zip(names, row)}}
        for name, row in zip(names, matrix)
    ]


def write_regions(
    root: Path,
    subject: Subject,
    atlas: Atlas,
    written: dict[str, Path],
    inverse: Path,
    track_method: str,
    dataset_link: str = "m2m",
    threads: int = 1,
    within: Path | None = None,
) -> tuple[dict[str, Path], dict]:
    """Write the unit's parcellation, region table and (when ``written`` holds a ``tractogram``)
    connectomes under ``root``; return the paths by key and a summary (regions found, streamlines
    assigned). ``written``: T1w-space files by key (``mask``, ``fa``, ``md``, ``ad``, ``rd``,
    optionally ``fa_sd`` and ``tractogram``); ``inverse``: the ``from-<template>_to-T1w`` transform as
    written in ``root``; ``dataset_link``: the BIDS URI dataset name of ``root`` in the sidecars;
    ``within``: a mask on the maps' grid that limits the parcellation further (the teacher's: the
    DWI's field of view, where its maps are defined)."""
    root = Path(root)
    paths = region_paths(root, subject, atlas.name, track_method)
    uri = lambda path: f"bids:{dataset_link}:{Path(path).relative_to(root).as_posix()}"  # noqa: E731
    mask_img, mask = load_image(written["mask"])
    inside = mask > 0
    if within is not None:
        inside &= load_image(within)[1] > 0
    labels = parcellate(atlas, inverse, mask_img.affine, inside, threads)
    regions = atlas.regions()
    names = [region.name for region in regions]
    generated = {"GeneratedBy": [{"Name": "m2m", "Version": __version__}]}
    atlas_keys = {
        "Atlas": atlas.name,
        "AtlasSource": atlas.source,
        "AtlasCitation": atlas.citation,
        "AtlasLicense": atlas.licence,
        "AtlasSpace": atlas.template,
    }
    out = {"dseg": save_nifti(labels, mask_img.affine, paths["dseg"], dtype=np.int16)}
    save_json(
        {
            "Description": f"{atlas.name} parcellation on the T1w grid of the maps, limited to the brain mask"
            + (" and the DWI's field of view" if within is not None else ""),
            **atlas_keys,
            "Resampling": "nearest neighbour through the inverse template transform",
            "Sources": [uri(written["mask"]), uri(inverse)],
            **generated,
        },
        sidecar_path(paths["dseg"]),
    )
    out["labels"] = save_tsv(
        [{"index": r.index, "name": r.name, "hemisphere": r.hemisphere, "structure": r.structure} for r in regions],
        paths["labels"],
    )
    maps = {key: load_image(written[key])[1] for key in (*REGION_MAPS, "fa_sd") if key in written}
    rows = region_table(labels, mask_img.affine, atlas, maps)
    out["regions"] = save_tsv(rows, paths["regions"])
    save_json(
        {
            **region_table_sidecar(),
            "Description": f"diffusion-tensor statistics per {atlas.name} region",
            **atlas_keys,
            "Sources": [uri(out["dseg"]), *(uri(written[key]) for key in maps)],
            **generated,
        },
        sidecar_path(paths["regions"]),
    )
    summary = {
        "atlas": atlas.name,
        "regions": len(regions),
        "regions_found": int(sum(row["volume_mm3"] > 0 for row in rows)),
    }
    if "tractogram" in written:
        streamlines = load_streamlines(written["tractogram"], written["mask"])
        counts, mean_fa, assigned = tractogram_connectome(streamlines, labels, mask_img.affine, maps["fa"], atlas)
        summary |= {"streamlines": len(streamlines), "assigned": assigned}
        sources = [uri(written["tractogram"]), uri(out["dseg"])]
        relmat = {
            **atlas_keys,
            "NodeFile": uri(out["labels"]),
            "EndpointAssignment": ASSIGNMENT,
            "Symmetric": True,
            "StreamlineCount": len(streamlines),
            "StreamlinesAssigned": assigned,
            "Sources": sources,
            **generated,
        }
        out["count"] = save_tsv(_relmat_rows(counts, names, integer=True), paths["count"])
        save_json(
            {
                "Description": "number of streamlines joining each pair of regions (diagonal: both ends in one region)",
                "Measure": "streamline count",
                **relmat,
            },
            sidecar_path(paths["count"]),
        )
        out["mean_fa"] = save_tsv(_relmat_rows(mean_fa, names, integer=False), paths["mean_fa"])
        save_json(
            {
                "Description": "mean FA along the streamlines joining each pair of regions: FA sampled "
                "trilinearly at every point, averaged per streamline, then over the edge's streamlines "
                "(n/a where no streamline joins them)",
                "Measure": "mean FA along streamlines",
                **relmat,
                "Sources": [*sources, uri(written["fa"])],
            },
            sidecar_path(paths["mean_fa"]),
        )
        from m2m_app.reports.figures import connectome_figure

        title = f"{subject.label}: {assigned} of {len(streamlines)} streamlines assigned ({atlas.name})"
        out["figure"] = save_bytes(connectome_figure(counts, names, title), paths["figure"])
        LOGGER.info("%s: %s, %d of %d streamlines assigned", subject.label, atlas.name, assigned, len(streamlines))
    return out, summary


#: The track method of the teacher's tractogram (``m2m-train prepare``'s file names).
TEACHER_TRACK = "tensordet"


def write_teacher_regions(
    prep_dir: Path,
    subject: Subject,
    t1w: Path,
    atlases: Sequence[str] = tuple(ATLASES),
    seed: int = 0,
    threads: int = 1,
) -> dict[str, dict]:
    """For each of ``atlases``, the teacher's parcellation, region table and connectome in
    ``prep_dir``: the unit's T1w registered to the atlas's template with the teacher's brain mask
    (transforms written beside, as the app writes them; kept on a re-run), then
    :func:`write_regions` on the teacher's tensor maps and tractogram, limited to the DWI's field of
    view (outside it the teacher has no maps). Returns the summaries by atlas."""
    import tempfile

    prep_dir = Path(prep_dir)
    teacher = derivative_paths(prep_dir, subject, TEACHER_TRACK)
    written = {key: teacher[key] for key in ("mask", *REGION_MAPS, "tractogram") if teacher[key].exists()}
    summaries = {}
    for name in atlases:
        atlas = ATLASES[name]()
        transforms = transform_paths(prep_dir, subject, atlas.template)
        if not all(path.exists() for path in transforms.values()):
            with tempfile.TemporaryDirectory() as tmp:
                forward, inverse = Path(tmp) / "forward.h5", Path(tmp) / "inverse.h5"
                register_t1w(t1w, teacher["mask"], TEMPLATES[atlas.template](), forward, inverse, seed, threads)
                copy_file(forward, transforms["forward"])
                copy_file(inverse, transforms["inverse"])
        fov = teacher_paths(prep_dir, subject)["fov"]
        _, summaries[name] = write_regions(
            prep_dir,
            subject,
            atlas,
            written,
            transforms["inverse"],
            TEACHER_TRACK,
            dataset_link="",
            threads=threads,
            within=fov if fov.exists() else None,
        )
    return summaries
