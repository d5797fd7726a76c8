"""The settings of one ``m2m`` participant run, decided once by the command line.

:class:`RunConfig` is built by :mod:`m2m_app.cli.run` from the click options (defaults
resolved: work folder, CPUs, threads), read by the workflows, and saved beside each
unit's crash files as ``sub-X[/ses-Y]/log/<run_id>/m2m.json`` (as fMRIPrep saves its
``config.toml``), so that a unit's outputs can be traced to the exact settings.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from m2m_app.data.atlases import ATLASES
from m2m_app.data.templates import OutputSpace, parse_output_spaces
from m2m_app.io.naming import Subject


def new_run_id() -> str:
    """A run identifier that sorts by start time: ``YYYYMMDD-HHMMSS_<8 hex digits>`` (UTC)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class RunConfig:
    """What the command line decides for every participant/session of one run.

    Paths are absolute; ``nprocs`` and ``omp_nthreads`` are resolved counts (CPUs of the
    whole run, threads per task), ``mem_mb`` megabytes or None (no limit);
    ``output_resolution`` is the outputs' isotropic voxel size in mm, or None for the T1w's own grid;
    ``output_spaces`` the ``--output-spaces`` entries (checked labels, e.g. ``MNI152NLin2009aSym:res-2``);
    ``atlases`` the ``--atlases`` names (checked, e.g. ``DesikanKilliany``);
    ``stop_dispersion_deg`` the V1 dispersion (degrees) above which streamlines stop, or None (off).
    """

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filter_file: Path | None = None
    skip_bids_validation: bool = False
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_mb: int | None = None
    use_plugin: Path | None = None
    device: str = "auto"
    weights_dir: str | None = None
    stop_on_first_crash: bool = False
    random_seed: int = 0
    tractogram_format: str = "trx"
    skip_phase2: bool = False
    skip_nerf: bool = False
    output_resolution: float | None = None
    output_spaces: tuple[str, ...] = ("T1w",)
    atlases: tuple[str, ...] = ()
    stop_dispersion_deg: float | None = None
    command_line: str = ""
    run_id: str = field(default_factory=new_run_id)

    @property
    def phases(self) -> tuple[str, ...]:
        """The translators this run uses (``phase1``, and ``phase2`` unless skipped)."""
        return ("phase1",) + (() if self.skip_phase2 else ("phase2",))

    @property
    def template_spaces(self) -> tuple[OutputSpace, ...]:
        """The template spaces asked for (the T1w-space outputs are always written: the others come from them)."""
        return tuple(space for space in parse_output_spaces(self.output_spaces) if space.is_template)

    @property
    def registered_templates(self) -> tuple[str, ...]:
        """The templates the T1w is registered to: those of the template spaces and of the atlases."""
        names = [space.name for space in self.template_spaces] + [ATLASES[name]().template for name in self.atlases]
        return tuple(dict.fromkeys(names))

    @property
    def runs_nerf(self) -> bool:
        """Whether phase 3 (the NeRF field, its views and streamlines) runs."""
        return not (self.skip_phase2 or self.skip_nerf)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (paths as strings, tuples as lists)."""
        return {
            key: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    def log_path(self, subject: Subject) -> Path:
        """Where this run's settings are saved for ``subject``: ``sub-X[/ses-Y]/log/<run_id>/m2m.json``."""
        return subject.folder(self.output_dir, "log") / self.run_id / "m2m.json"

    def save(self, subject: Subject) -> Path:
        """Write the settings for ``subject`` (atomically; see :meth:`log_path`)."""
        from m2m_app import __version__
        from m2m_app.io.files import save_json

        path = self.log_path(subject)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_json({"m2m_version": __version__, "subject": subject.label, "run": self.to_dict()}, path)
