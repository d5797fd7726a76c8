"""Group level in template space: FA mean and SD maps and a table of tissue means per unit.

For each template space (name and resolution) in which participants were written, with every
unit's template-space maps found under ``OUTPUT_DIR/sub-*/``:

- ``group_space-<T>[_res-N]_desc-mean_FA.nii.gz`` / ``..._desc-sd_FA.nii.gz``: per voxel, the
  mean and sample standard deviation (n − 1) of FA over the units whose brain mask holds it,
  and ``..._desc-count_mask.nii.gz`` how many they are (the SD needs two);
- ``group_space-<T>[_res-N]_tissue.tsv``: one row per participant/session, the mean FA, MD, AD and
  RD in the template's white matter and in its grey matter (probability > :data:`TISSUE_PROBABILITY`,
  inside the unit's mask), with the voxel counts: ready for a statistics package.

And for each atlas of ``--atlases``, with every unit's region table found:
``group_space-T1w_seg-<atlas>_model-tensor_dwimap.tsv``, the units' region tables one below the
other (long format: ``participant_id``, ``session_id``, then the region table's columns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m2m_app.data.templates import OutputSpace
from m2m_app.io.files import read_tsv, save_tsv
from m2m_app.io.naming import Subject, derivative_paths
from m2m_app.io.nifti import load_image, save_nifti
from m2m_app.registration.normalize import load_template

#: A template voxel belongs to a tissue when its probability exceeds this.
TISSUE_PROBABILITY = 0.5
#: The scalar maps averaged per tissue.
TISSUE_PARAMS = ("fa", "md", "ad", "rd")
_FA_NAME = re.compile(
    r"^(?P<unit>sub-[^_]+(?:_ses-[^_]+)?)_space-(?P<space>[A-Za-z0-9]+)(?:_res-(?P<res>\d+))?"
    r"_model-tensor_param-fa_dwimap\.nii\.gz$"
)


@dataclass
class GroupSpace:
    """What the group level wrote for one template space."""

    space: OutputSpace
    units: list[str]
    maps: dict[str, Path] = field(default_factory=dict)
    table: Path | None = None
    rows: list[dict] = field(default_factory=list)


def _units_by_space(output_dir: Path) -> dict[OutputSpace, dict[str, Path]]:
    """Every unit's template-space FA map, by space then unit label."""
    found: dict[OutputSpace, dict[str, Path]] = {}  # the unit labels are read from the file names
    for path in sorted(Path(output_dir).glob("sub-*/**/dwi/*_model-tensor_param-fa_dwimap.nii.gz")):
        match = _FA_NAME.match(path.name)
        if match and match["space"] != "T1w":
            space = OutputSpace(match["space"], int(match["res"]) if match["res"] else None)
            found.setdefault(space, {})[match["unit"]] = path
    return found


def write_group_template_outputs(output_dir: Path) -> list[GroupSpace]:
    """Write the group maps and tissue table of every template space found (see the module text)."""
    output_dir = Path(output_dir)
    written = []
    for space, fa_paths in _units_by_space(output_dir).items():
        template = load_template(space.template(), space.resolution)
        tissues = {"wm": template.wm > TISSUE_PROBABILITY, "gm": template.gm > TISSUE_PROBABILITY}
        total = np.zeros(template.shape, np.float64)
        squares = np.zeros(template.shape, np.float64)
        count = np.zeros(template.shape, np.int32)
        rows = []
        for unit in fa_paths:
            paths = derivative_paths(output_dir, Subject.from_label(unit), "nerf", space=space.entities)
            mask = load_image(paths["mask"])[1] > 0
            row: dict = {"subject": unit}
            for param in TISSUE_PARAMS:
                values = load_image(paths[param])[1]
                if param == "fa":
                    total += np.where(mask, values, 0.0)
                    squares += np.where(mask, values.astype(np.float64) ** 2, 0.0)
                    count += mask
                for tissue, where in tissues.items():
                    inside = where & mask
                    row[f"{param}_{tissue}"] = float(values[inside].mean()) if inside.any() else float("nan")
            for tissue, where in tissues.items():
                row[f"voxels_{tissue}"] = int((where & mask).sum())
            rows.append(row)
        prefix = "group_" + "_".join(f"{key}-{value}" for key, value in space.entities.items())
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        variance = np.divide(squares - count * mean**2, count - 1, out=np.zeros_like(total), where=count > 1)
        group = GroupSpace(space, list(fa_paths), rows=rows)
        group.maps = {
            "mean": save_nifti(mean, template.affine, output_dir / f"{prefix}_desc-mean_FA.nii.gz"),
            "sd": save_nifti(
                np.sqrt(np.clip(variance, 0, None)), template.affine, output_dir / f"{prefix}_desc-sd_FA.nii.gz"
            ),
            "count": save_nifti(
                count, template.affine, output_dir / f"{prefix}_desc-count_mask.nii.gz", dtype=np.int16
            ),
        }
        group.table = save_tsv(rows, output_dir / f"{prefix}_tissue.tsv")
        written.append(group)
    return written


_REGIONS_NAME = re.compile(
    r"^(?P<unit>sub-[^_]+(?:_ses-[^_]+)?)_space-T1w_seg-(?P<atlas>[A-Za-z0-9]+)_model-tensor_dwimap\.tsv$"
)


def write_group_regions(output_dir: Path) -> list[Path]:
    """Write one long table of region statistics per atlas (see the module text); return their paths."""
    output_dir = Path(output_dir)
    rows: dict[str, list[dict]] = {}
    for path in sorted(output_dir.glob("sub-*/**/dwi/*_space-T1w_seg-*_model-tensor_dwimap.tsv")):
        match = _REGIONS_NAME.match(path.name)
        if match:
            unit = Subject.from_label(match["unit"])
            ids = {
                "participant_id": f"sub-{unit.participant}",
                "session_id": f"ses-{unit.session}" if unit.session else "n/a",
            }
            rows.setdefault(match["atlas"], []).extend(ids | row for row in read_tsv(path))
    return [
        save_tsv(table, output_dir / f"group_space-T1w_seg-{atlas}_model-tensor_dwimap.tsv")
        for atlas, table in rows.items()
    ]
