"""Leave-one-person-out folds over a prep dir's manifest.

A person (BIDS participant) is never on both sides of a split: all sessions of the held-out
participant are tested, all sessions of every other participant are trained on.

``python -m m2m_app.training.folds PREP_DIR`` prints one fold per line,
``TEST<TAB>TRAIN,TRAIN,...<TAB>N_TRAIN_UNITS`` (participants as ``sub-XX``), for
``scripts/train_shipped_weights.sh``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from m2m_app.errors import UsageError
from m2m_app.io.manifest import read_manifest, select_rows


@dataclass(frozen=True)
class Fold:
    """One split: participant labels (``sub-XX``) and the manifest units (``subject`` column) on each side."""

    test: str
    train: tuple[str, ...]
    test_units: tuple[str, ...]
    train_units: tuple[str, ...]


def leave_one_person_out(rows: list[dict[str, str]]) -> list[Fold]:
    """One fold per participant of the manifest ``rows`` (needs ``participant`` and ``subject``), sorted.

    Raises :class:`~m2m_app.errors.UsageError` with fewer than two participants.
    """
    units: dict[str, list[str]] = {}
    for row in rows:
        units.setdefault(f"sub-{row['participant']}", []).append(row["subject"])
    if len(units) < 2:
        raise UsageError(f"leave-one-person-out needs two participants or more, got {sorted(units) or 'none'}")
    people = sorted(units)
    return [
        Fold(
            test=person,
            train=tuple(p for p in people if p != person),
            test_units=tuple(sorted(units[person])),
            train_units=tuple(sorted(u for p in people if p != person for u in units[p])),
        )
        for person in people
    ]


def held_out_rows(prep_dir: Path, trained_on: Iterable[str]) -> list[tuple[dict, Path]]:
    """:func:`~m2m_app.io.manifest.select_rows` of ``prep_dir`` whose person is in none of the units
    ``trained_on`` (manifest ``subject`` labels, e.g. a weights' ``recipe.subjects``): a person one
    of whose sessions was trained on is left out with all their sessions."""
    trained_people = {unit.split("_")[0] for unit in trained_on}
    return [
        (row, prep) for row, prep in select_rows([prep_dir], None) if f"sub-{row['participant']}" not in trained_people
    ]


def main(argv: list[str]) -> None:
    """Print the folds of the prep dir ``argv[0]`` (see the module docstring)."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m m2m_app.training.folds PREP_DIR")
    for fold in leave_one_person_out(read_manifest(Path(argv[0]))):
        sys.stdout.write(f"{fold.test}\t{','.join(fold.train)}\t{len(fold.train_units)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
