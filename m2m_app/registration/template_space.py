"""A unit's derivatives in a template space, from its T1w-space derivatives and the registration.

Every map is sampled where the forward transform sends each template voxel (the coordinate
field of :func:`~m2m_app.registration.normalize.coordinate_field`): FA, MD, AD, RD and the
uncertainty maps trilinearly (what ``antsApplyTransforms -n Linear`` gives), the brain mask as
its trilinear weight ≥ 0.5, the tensor's components trilinearly, normalised by the mask's
weight, then reoriented by the finite-strain rotation of the warp's local Jacobian
(:mod:`m2m_app.maths.warp`); V1 is the reoriented tensor's principal eigenvector and colour
FA ``|V1| × FA``. Streamline points go through the inverse transform's coordinate field.
The registration's quality: Dice of the warped brain mask with the template's brain (on the
output grid), and the correlation of the warped T1w with the template's T1w in the template's
brain (on the registration's 2 mm grid).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine

from m2m_app import __version__
from m2m_app.data.templates import OutputSpace
from m2m_app.io.derivatives import PREDICTED
from m2m_app.io.files import save_bytes, save_json
from m2m_app.io.naming import Subject, derivative_path, derivative_paths, sidecar_path
from m2m_app.io.nifti import grid_header, load_image, load_t1w, save_nifti
from m2m_app.io.tractogram import load_streamlines, save_tractogram
from m2m_app.maths.grid import in_threads, isotropic_grid
from m2m_app.maths.metrics import dice, pearson
from m2m_app.maths.tensor import components_to_matrix, eigen_decomposition, matrix_to_components, rotate_tensors
from m2m_app.maths.warp import field_jacobian, grid_points, moving_to_fixed_rotation, sample
from m2m_app.registration.normalize import REGISTRATION_MM, coordinate_field, load_template

LOGGER = logging.getLogger(__name__)

#: Maps resampled as scalars (trilinear).
SCALAR_KEYS = ("fa", "md", "ad", "rd", "fa_sd", "v1_dispersion")
#: Below these, the registration is flagged in the QC and the report.
MIN_DICE, MIN_CORRELATION = 0.90, 0.50
#: Tensors reoriented in one piece (bounds the memory of the 3×3 matrices).
TENSOR_CHUNK = 200_000


def transform_paths(output_dir: Path, subject: Subject, template: str) -> dict[str, Path]:
    """``forward`` (``from-T1w_to-<template>_mode-image_xfm.h5``) and ``inverse`` (``from-<template>_to-T1w``)."""
    return {
        "forward": derivative_path(
            output_dir, subject, "anat", "xfm", ".h5", mode="image", **{"from": "T1w", "to": template}
        ),
        "inverse": derivative_path(
            output_dir, subject, "anat", "xfm", ".h5", mode="image", **{"from": template, "to": "T1w"}
        ),
    }


def space_paths(output_dir: Path, subject: Subject, space: OutputSpace, tractogram_format: str) -> dict[str, Path]:
    """The template-space files of one unit, keyed like :func:`~m2m_app.io.naming.derivative_paths`."""
    every = derivative_paths(output_dir, subject, "nerf", tractogram_format, space=space.entities)
    return {key: every[key] for key in (*SCALAR_KEYS, "diffusivity", "v1", "colfa", "mask", "tractogram")}


def _sidecar(description: str, source: Path, output_dir: Path, space: OutputSpace, forward: Path, **extra) -> dict:
    """The T1w-space ``source``'s sidecar (weights, units, BEP046 tracking keys…) with the template's keys."""
    template = space.template()
    native = sidecar_path(Path(source))
    return {
        **(json.loads(native.read_text()) if native.exists() else {}),
        "Description": f"{description}, in {space.label}; {PREDICTED}",
        "SpatialReference": space.name,
        "Template": template.source,
        "TemplateCitation": template.citation,
        **({"Resolution": f"{space.resolution} mm isotropic"} if space.resolution else {}),
        "Sources": [f"bids:m2m:{Path(p).relative_to(output_dir).as_posix()}" for p in (source, forward)],
        "Transform": Path(forward).name,
        "GeneratedBy": [{"Name": "m2m", "Version": __version__}],
        **extra,
    }


def write_template_space(
    output_dir: Path,
    subject: Subject,
    space: OutputSpace,
    t1w: Path,
    written: dict[str, Path],
    transforms: dict[str, Path],
    tractogram_format: str = "trx",
    threads: int = 1,
) -> tuple[dict[str, Path], dict]:
    """Write ``written`` (T1w-space derivatives by key, the mask among them) in ``space``.

    ``transforms`` holds the registration's ``forward`` and ``inverse`` composite transforms
    (already in the output folder). Returns the written paths by key and the registration's
    QC: ``dice``, ``correlation`` and ``flagged`` (either below :data:`MIN_DICE` /
    :data:`MIN_CORRELATION`).
    """
    output_dir = Path(output_dir)
    template = load_template(space.template(), space.resolution)
    on_registration_grid = space.resolution == REGISTRATION_MM  # then the same grid (``template_grid``)
    coarse = template if on_registration_grid else load_template(space.template(), REGISTRATION_MM)
    paths = space_paths(output_dir, subject, space, tractogram_format)
    mask_img, mask = load_image(written["mask"])
    # The forward field on the registration's grid, where the SyN warp lives: its trilinear
    # interpolation onto the template grid is ANTs' own mapping (an affine map of a trilinear field).
    coarse_field = coordinate_field(
        transforms["forward"], coarse.shape, coarse.affine, mask.shape, mask_img.affine, threads
    )
    field = (
        coarse_field
        if on_registration_grid
        else sample(coarse_field, coarse.affine, grid_points(template.shape, template.affine), threads=threads)
    ).reshape(template.shape + (3,))
    weight = sample(mask > 0, mask_img.affine, field.reshape(-1, 3), threads=threads).reshape(template.shape)
    inside = weight >= 0.5
    points = field[inside]
    out: dict[str, Path] = {}

    def write(key: str, values: np.ndarray, description: str, source: Path, dtype=np.float32, **extra) -> None:
        volume = np.zeros(template.shape + values.shape[1:], dtype=dtype)
        volume[inside] = values
        out[key] = save_nifti(volume, template.affine, paths[key], dtype=dtype)
        sidecar = _sidecar(description, source, output_dir, space, transforms["forward"], **extra)
        save_json(sidecar, sidecar_path(out[key]))

    write(
        "mask",
        np.ones(len(points), bool),
        "brain mask (where the predicted maps are defined)",
        written["mask"],
        np.uint8,
    )
    scalars = {}
    for key in SCALAR_KEYS:
        if key in written:
            img, data = load_image(written[key])
            scalars[key] = sample(data, img.affine, points, threads=threads)
            write(
                key,
                scalars[key],
                f"{key} of the T1w space, resampled trilinearly",
                written[key],
            )
    if "diffusivity" in written:
        img, data = load_image(written["diffusivity"])
        components = sample(data, img.affine, points, threads=threads) / weight[inside][:, None]
        rotations = _rotations(coarse_field, coarse.affine, apply_affine(template.affine, np.argwhere(inside)))
        tensors, v1 = _reoriented(components, rotations, threads)
        reorientation = {"TensorReorientation": "finite strain (Alexander et al. 2001), from the warp's local Jacobian"}
        description = (
            "diffusion tensor D11 D12 D13 D22 D23 D33 in the template's RAS+ frame: components interpolated "
            "trilinearly (normalised by the brain mask's weight), then reoriented"
        )
        write("diffusivity", tensors, description, written["diffusivity"], Units="mm^2/s", **reorientation)
        description = "principal eigenvector of the reoriented tensor (x, y, z) in the template's RAS+ frame"
        write("v1", v1, description, written["diffusivity"], **reorientation)
        if "fa" in scalars:
            description = "colour FA: |V1| * FA (red L-R, green A-P, blue I-S)"
            write("colfa", np.abs(v1) * scalars["fa"][:, None], description, written["diffusivity"], **reorientation)
    if "tractogram" in written:
        out["tractogram"] = _move_tractogram(
            written["tractogram"],
            written["mask"],
            transforms["inverse"],
            mask_img,
            template,
            paths["tractogram"],
            threads,
        )
        moved = _sidecar(
            "the T1w-space tractogram's points moved through the inverse transform",
            written["tractogram"],
            output_dir,
            space,
            transforms["inverse"],
        )
        save_json(moved, sidecar_path(out["tractogram"]))
    t1w_img, t1w_data = load_t1w(t1w)
    # the T1w on the registration grid: the correlation and the reportlet
    warped_t1w = sample(t1w_data, t1w_img.affine, coarse_field.reshape(-1, 3), threads=threads).reshape(coarse.shape)
    qc = {
        "dice": round(dice(inside, template.brain), 4),
        "correlation": round(pearson(warped_t1w[coarse.brain], coarse.t1w[coarse.brain]), 4),
    }
    qc["flagged"] = bool(not (qc["dice"] >= MIN_DICE and qc["correlation"] >= MIN_CORRELATION))
    if qc["flagged"]:
        LOGGER.warning("%s: poor registration to %s: %s", subject.label, space.label, qc)
    out |= _figures(output_dir, subject, space, warped_t1w, coarse, template, out.get("fa"))
    return out, qc


def _rotations(coarse_field: np.ndarray, coarse_affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The finite-strain rotation ``(N, 3, 3)`` from the T1w frame into the template's at template points ``(N, 3)``:
    the Jacobian of the forward field at the nearest node of the registration grid (central
    differences over 2 nodes; the SyN warp is smooth over several nodes), one SVD per node used."""
    shape = coarse_field.shape[:3]
    nodes = np.clip(np.rint(apply_affine(np.linalg.inv(coarse_affine), points)).astype(int), 0, np.array(shape) - 1)
    unique, which = np.unique(np.ravel_multi_index(tuple(nodes.T), shape), return_inverse=True)
    used = np.stack(np.unravel_index(unique, shape), axis=1)
    rotation = moving_to_fixed_rotation(field_jacobian(coarse_field, coarse_affine, used))
    return rotation[which.ravel()]


def _reoriented(components: np.ndarray, rotations: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """T1w-frame tensors ``(N, 6)`` seen in the template frame, ``D' = R D Rᵀ`` with the rotations
    ``(N, 3, 3)`` of :func:`_rotations`: the new components ``(N, 6)`` and principal eigenvectors
    ``(N, 3)``, float32, in ``threads`` threads."""
    tensors = np.empty(components.shape, dtype=np.float32)
    v1 = np.empty((len(components), 3), dtype=np.float32)

    def reorient(rows: slice) -> None:
        matrices = rotate_tensors(components_to_matrix(components[rows]), rotations[rows])
        tensors[rows] = matrix_to_components(matrices)
        v1[rows] = eigen_decomposition(matrices)[1][..., :, 0]

    in_threads(reorient, len(components), threads, TENSOR_CHUNK)
    return tensors, v1


def _move_tractogram(tractogram, reference, inverse, mask_img, template, path, threads) -> Path:
    """The tractogram's points (T1w RAS mm) moved into the template; its header on the template grid."""
    shape, affine = isotropic_grid(mask_img.shape, mask_img.affine, REGISTRATION_MM)
    back = coordinate_field(inverse, shape, affine, template.shape, template.affine, threads)
    streamlines = load_streamlines(tractogram, reference)
    lengths = [len(s) for s in streamlines]
    moved = (
        sample(back, affine, np.concatenate(streamlines), threads=threads)
        if streamlines
        else np.zeros((0, 3), np.float32)
    )
    return save_tractogram(
        np.split(moved, np.cumsum(lengths)[:-1]) if streamlines else [],
        grid_header(template.shape, template.affine),
        path,
    )


def _figures(output_dir, subject, space, warped_t1w, coarse, template, fa_path) -> dict[str, Path]:
    """The normalisation reportlet (the warped T1w with the template's brain and white-matter
    outlines, as fMRIPrep shows it) and the FA in the template."""
    from m2m_app.reports.figures import mosaic

    entities = {**space.entities, "desc": "normalization"}
    drawn = {
        "normalization": mosaic(
            warped_t1w,
            coarse.affine,
            contour=coarse.wm > 0.5,
            fmt="svg",
            title=f"T1w in {space.label}, template white matter outlined",
        )
    }
    if fa_path is not None:
        drawn["fa_template"] = mosaic(
            load_image(fa_path)[1],
            template.affine,
            underlay=template.t1w,
            contour=template.brain,
            cmap="inferno",
            vmax=0.8,
            fmt="svg",
            title=f"FA in {space.label}",
        )
    out = {}
    for name, data in drawn.items():
        suffix = "T1w" if name == "normalization" else "FA"
        path = derivative_path(
            output_dir, subject, "figures", suffix, ".svg", **(entities if name == "normalization" else space.entities)
        )
        out[f"figure_{name}"] = save_bytes(data, path)
    return out
