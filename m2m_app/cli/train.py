"""``m2m-train``: build training targets from a BIDS dataset with DWI, train and evaluate."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from m2m_app import __version__
from m2m_app.cli.common import (
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
from m2m_app.errors import EX_FAILURE, M2MError
from m2m_app.io import bids as bids_io
from m2m_app.io.naming import Subject
from m2m_app.io.crashes import crash_reasons
from m2m_app.training.recipe import FA_DETAIL_SIGMA_MM, FA_DETAIL_WEIGHT, FINE_TUNE_LR, TrainingRecipe

LOGGER = logging.getLogger("m2m.train")

#: The shipped weights' recipe: the defaults of ``phase1`` and ``phase2``.
DEFAULT = TrainingRecipe()
#: The ``Name`` of a prep dir's ``dataset_description.json``.
PREP_NAME = "m2m teacher targets (m2m-train prepare)"

verbosity = [
    click.option("-v", "--verbose", count=True, help="More log output (-vv: debug)."),
    click.option("-q", "--quiet", count=True, help="Less log output."),
]


def with_verbosity(func):
    """Add ``-v``/``-q`` to a command."""
    for option in reversed(verbosity):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m2m-train")
def cli() -> None:
    """Train m2m's translators on your own data.

    \b
    1. m2m-train prepare BIDS_DIR PREP_DIR   # teacher: tensor fit, registration, tractography
    2. m2m-train phase1 PREP_DIR MODEL_DIR   # T1w -> DTI translator
    3. m2m-train phase2 PREP_DIR MODEL_DIR   # DTI -> tractography-slice translator
    4. m2m-train evaluate PREP_DIR MODEL_DIR # held-out metrics against baselines

    Then run the app with `m2m --weights-dir MODEL_DIR ...` to use your weights.
    """


@cli.command()
@click.argument("bids_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prep_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--participant-label",
    "participant_labels",
    multiple=True,
    help="Participant(s) to prepare, with or without 'sub-' (default: all). Repeatable.",
)
@click.option("--session-label", "session_labels", multiple=True, help="Session(s) to prepare. Repeatable.")
@click.option(
    "--bids-filter-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help='JSON selecting files, e.g. {"t1w": {"acquisition": "mprage"}, "dwi": {"run": 1}}.',
)
@click.option(
    "--nprocs",
    type=click.IntRange(min=1),
    default=None,
    help="Participants processed in parallel (Nipype MultiProc; default: all cores).",
)
@click.option(
    "--use-plugin",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Nipype plugin YAML (e.g. SLURM) instead of MultiProc.",
)
@click.option(
    "-w",
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Nipype work folder; never inside BIDS_DIR (default: PREP_DIR/.m2m_work, or "
    "BIDS_DIR/../m2m_work/<dataset folder name> when PREP_DIR is below BIDS_DIR/derivatives/).",
)
@click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of the tractography.")
@click.option(
    "--dwi-derivatives",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="QSIPrep's output folder: take each unit's preprocessed DWI (desc-preproc, space-ACPC or "
    "space-T1w) and preprocessed T1w from there, in one space, so nothing is registered. BIDS_DIR "
    "then only lists the participants/sessions and may hold no DWI.",
)
@click.option(
    "--omp-nthreads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads per unit (deepbet's torch, ANTs' ITK).",
)
@click.option(
    "--atlases",
    "atlases",
    multiple=True,
    metavar="ATLAS",
    help="Parcellations of the teacher's region tables and connectomes, which m2m-train evaluate-regions and "
    "evaluate-tractogram score m2m's against: per unit an ANTs registration to the atlas's template (rigid, "
    "affine, SyN; about a minute on 2 threads). Default: every shipped atlas (DesikanKilliany); --atlases none: "
    "none (training needs none). A unit prepared before gets the missing ones on a re-run.",
)
@with_verbosity
@exits_cleanly
def prepare(
    bids_dir: Path,
    prep_dir: Path,
    participant_labels: tuple[str, ...],
    session_labels: tuple[str, ...],
    bids_filter_file: Path | None,
    nprocs: int | None,
    use_plugin: Path | None,
    work_dir: Path | None,
    random_seed: int,
    dwi_derivatives: Path | None,
    omp_nthreads: int,
    atlases: tuple[str, ...],
    verbose: int,
    quiet: int,
) -> None:
    """Compute training targets from every T1w + DWI pair in BIDS_DIR into PREP_DIR.

    For each participant/session: brain mask (deepbet) and tissue classes (ANTs Atropos)
    of the T1w; per DWI series (same grid and phase encoding) a tensor fit (dipy WLS, shells
    up to b=1500), b0->T1w rigid registration (from the headers, checked against ANTs),
    deterministic tractography (.trx); tensor maps, track-density maps and the DWI's field
    of view on the T1w grid, a QC figure, and per atlas (--atlases) a parcellation, region
    table and connectome; then PREP_DIR/manifest.tsv lists the pairs with
    QC numbers. A unit whose QC is implausible (registration > 2.5 mm from ANTs' or > 12 mm
    from the headers, white matter outside 20-55 % of the brain, < 25 % of the brain in the
    DWI's field of view) is flagged there and left out of training unless --include-flagged.
    Finished units are skipped on a re-run; a failed unit does not stop the others and
    makes the exit code 1. PREP_DIR lies outside BIDS_DIR or below its derivatives/ folder
    (e.g. BIDS_DIR/derivatives/m2m-prep).

    With --dwi-derivatives QSIPREP_DIR each unit of BIDS_DIR takes QSIPrep's preprocessed T1w and
    DWI instead (no registration: identity transform); a unit missing there fails on its own.
    """
    from m2m_app.data.atlases import ATLASES, parse_atlases
    from m2m_app.io.derivatives import dataset_description, source_link_name
    from m2m_app.io.manifest import qc_path, write_manifest
    from m2m_app.io.nifti import load_t1w
    from m2m_app.registration.parcellation import TEACHER_TRACK, region_paths
    from m2m_app.reports.methods import TEACHER_SOFTWARE, teacher_cited, write_bibtex
    from m2m_app.teacher.prepare import load_dwi_runs
    from m2m_app.workflows.prepare import init_prepare_wf, node_name

    setup_logging(verbose, quiet)
    layout = bids_io.load_layout(bids_dir)
    check_location(prep_dir, "prep folder", bids_dir, suggested="m2m-prep")
    work_dir = Path(work_dir) if work_dir else work_dir_outside(Path(prep_dir) / ".m2m_work", bids_dir)
    check_location(work_dir, "work folder", bids_dir)
    if dwi_derivatives:  # nor inside QSIPrep's output, which is read as a dataset too
        check_location(prep_dir, "prep folder", dwi_derivatives)
        check_location(work_dir, "work folder", dwi_derivatives)
    prep_dir, work_dir = writable_dir(prep_dir, "prep folder"), writable_dir(work_dir, "work folder")
    filters = bids_io.read_filters(bids_filter_file)
    preprocessed = bids_io.load_layout(dwi_derivatives, derivative=True) if dwi_derivatives else None

    atlas_names = parse_atlases(atlases) if atlases else tuple(ATLASES)

    def missing_regions(subject: Subject) -> list[str]:
        return [a for a in atlas_names if not region_paths(prep_dir, subject, a, TEACHER_TRACK)["regions"].exists()]

    def find(subject: Subject) -> tuple[Path, list[Path]] | None:
        done = qc_path(prep_dir, subject).exists()
        missing = missing_regions(subject) if done else []
        if done and not missing:
            LOGGER.info("%s: already prepared, skipping", subject.label)
            return None
        if preprocessed is not None:  # a unit missing from QSIPrep's output is an error of its own
            t1w, dwi = bids_io.find_preprocessed_dwi(preprocessed, subject, filters)
        else:
            try:
                t1w = bids_io.find_t1w(layout, subject, filters)
                dwi = [] if done else bids_io.find_dwi(layout, subject, filters)
            except M2MError as err:  # a unit without DWI is no training pair: skip unless asked for
                LOGGER.warning("%s", err)
                if participant_labels:
                    raise
                return None
        if done:
            LOGGER.info("%s: already prepared; its regions: %s", subject.label, ", ".join(missing))
            return t1w, dwi
        load_t1w(t1w)  # read every input once now, so bad data fails with its own message and exit code
        load_dwi_runs(dwi)
        return t1w, dwi

    subjects = bids_io.collect_subjects(layout, list(participant_labels), list(session_labels))
    units, errors = collect_units(subjects, find)
    failures = {label: str(err) for label, err in errors.items()}
    codes = {err.exit_code for err in errors.values()}
    ok = True
    link = source_link_name(prep_dir, bids_dir)  # a second dataset in one prep dir gets its own key
    dwi_source = "qsiprep" if dwi_derivatives else "raw"
    if dwi_derivatives:  # the units' files come from QSIPrep's dataset, linked under a key of its own
        dataset_description(prep_dir, bids_dir, name=PREP_NAME, link=link)
        link = source_link_name(prep_dir, dwi_derivatives)
    prepared = {subject for subject in units if qc_path(prep_dir, subject).exists()}  # their regions only
    if units:
        LOGGER.info(
            "preparing %d unit(s): %s",
            len(units),
            ", ".join(s.label + " (parcellations)" * (s in prepared) for s in units),
        )
        workflow = init_prepare_wf(
            units, prep_dir, work_dir, random_seed, omp_nthreads, link, dwi_source, atlas_names, prepared
        )
        citation = write_citation(prep_dir, workflow)
        write_bibtex(citation.with_suffix(".bib"), teacher_cited(dwi_source, bool(atlas_names)), TEACHER_SOFTWARE)
        workflow.config["execution"]["crashdump_dir"] = str(prep_dir / "logs")
        ok = run_workflow(workflow, plugin_settings(nprocs, None, use_plugin), stop_on_first_crash=False)
        reasons = crash_reasons(prep_dir / "logs")
        for subject in units:
            if not qc_path(prep_dir, subject).exists():
                failures[subject.label] = reasons.get(node_name(subject), "see the crash file in PREP_DIR/logs")
                codes.add(EX_FAILURE)
            elif missing := missing_regions(subject):
                # the training pair stays usable; only the evaluate commands' region scores miss it
                reason = reasons.get(node_name(subject).replace("prepare_", "regions_", 1), "see PREP_DIR/logs")
                click.echo(
                    f"m2m-train prepare: {subject.label}: no teacher parcellation ({', '.join(missing)}): {reason}; "
                    "a re-run makes it",
                    err=True,
                )
                codes.add(EX_FAILURE)
    dataset_description(prep_dir, dwi_derivatives or bids_dir, name=PREP_NAME, link=link)
    manifest = write_manifest(prep_dir, failures)
    echo_failures("m2m-train prepare", failures)
    for row in json.loads((prep_dir / "manifest.json").read_text())["pairs"]:
        if row.get("flagged"):
            click.echo(
                f"m2m-train prepare: {row['subject']} FLAGGED, left out of training unless "
                f"--include-flagged: {row['flags']} (see {row['qc_figure']})",
                err=True,
            )
    LOGGER.info("manifest: %s", manifest)
    sys.exit(exit_code_for(codes, ok))


def held_out_scoring(test_subject_required: bool = True):
    """PREP_DIR, WEIGHTS_DIR, --phase, --test-subject, --predicted-inputs, --device: what
    ``evaluate`` and ``calibrate`` share (``calibrate --store-scale`` may score no subject)."""
    return lambda func: _held_out_options(func, test_subject_required)


def _held_out_options(func, test_subject_required: bool):
    options = [
        click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path)),
        click.argument("weights_dir", required=False, type=click.Path(file_okay=False, exists=True, path_type=Path)),
        click.option("--phase", type=click.Choice(["1", "2"]), default="1", show_default=True),
        click.option(
            "--test-subject",
            "test_subjects",
            multiple=True,
            required=test_subject_required,
            help="Held-out subject(s) of WEIGHTS_DIR to score (default weights: the packaged ones). Repeatable.",
        ),
        click.option(
            "--predicted-inputs",
            type=click.Path(file_okay=False, exists=True, path_type=Path),
            help="Phase 2: score on phase-1 predictions instead of the teacher's maps.",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def training_options(func):
    """Options shared by ``phase1`` and ``phase2``; their defaults are the shipped weights' recipe."""
    options = [
        click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path)),
        click.argument("model_out", type=click.Path(file_okay=False, path_type=Path)),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=DEFAULT.epochs,
            show_default=True,
            help="Total epochs; a re-run resumes from the last checkpoint up to this number. "
            "The shipped weights saw about 3 400 steps per phase (phase 1: 24 epochs of 5 sessions).",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=DEFAULT.batch_size,
            show_default=True,
            help="Slices per step (per GPU under torchrun).",
        ),
        click.option(
            "--lr",
            type=float,
            default=DEFAULT.lr,
            show_default=True,
            help=f"Adam learning rate (with --init-weights, unless given: {FINE_TUNE_LR:g}).",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--random-seed",
            "seed",
            type=int,
            default=DEFAULT.seed,
            show_default=True,
            help="Seeds weights, shuffling and augmentation.",
        ),
        click.option(
            "--subject",
            "subjects",
            multiple=True,
            help="Train only on these (sub-01, 01 or sub-01_ses-a); repeatable. Default: all.",
        ),
        click.option(
            "--width",
            "base",
            type=click.IntRange(min=4),
            default=DEFAULT.base,
            show_default=True,
            help="Channels of the first encoder level (doubles per level); 24 has ~2x the "
            "parameters and trains ~2x slower.",
        ),
        click.option(
            "--ema-decay",
            type=click.FloatRange(min=0.0, max=1.0, max_open=True),
            default=DEFAULT.ema_decay,
            show_default=True,
            help="Ship a moving average of the generator's weights (decay per step) instead "
            "of its last weights, which an adversarial run can catch on a spike. 0: off.",
        ),
        click.option(
            "--elastic-px",
            type=click.FloatRange(min=0.0),
            default=DEFAULT.elastic_px,
            show_default=True,
            help="Elastic augmentation: half of the geometric augmentations also deform the "
            "slice smoothly by up to this many 2 mm pixels. 0: affine only.",
        ),
        click.option(
            "--extra-prep-dir",
            "extra_prep_dirs",
            multiple=True,
            type=click.Path(file_okay=False, exists=True, path_type=Path),
            help="Pool subjects of further prep dirs (e.g. several sites). Repeatable.",
        ),
        click.option(
            "--mixed-precision/--no-mixed-precision",
            default=DEFAULT.mixed_precision,
            show_default=True,
            help="On CUDA, run the networks in bfloat16 (float16 where the GPU lacks it) with losses and "
            "weights in float32. Ignored on the CPU.",
        ),
        click.option(
            "--init-weights",
            metavar="packaged|DIR",
            help="Fine-tune: start the translator from these weights ('packaged': the shipped ones; DIR: a "
            "folder with <phase>.safetensors), keeping their architecture; the weights' JSON records their "
            f"SHA-256, and --lr defaults to {FINE_TUNE_LR:g} instead.",
        ),
        click.option(
            "--include-flagged",
            is_flag=True,
            help="Also train on units whose teacher QC was flagged (registration far from "
            "ANTs' or the headers, implausible tissue volumes; see manifest.tsv 'flags').",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return with_verbosity(func)


def _train(
    phase: str,
    prep_dir: Path,
    model_out: Path,
    subjects: tuple[str, ...],
    extra_prep_dirs: tuple[Path, ...],
    verbose: int,
    quiet: int,
    **kwargs,
) -> None:
    from m2m_app.training.loop import train_phase

    setup_logging(verbose, quiet)
    writable_dir(model_out, "model folder")
    if kwargs["init_weights"] is not None:  # fine-tuning: its own learning rate, the weights' architecture
        context = click.get_current_context()
        if context.get_parameter_source("base") is not ParameterSource.DEFAULT:
            raise click.UsageError("--width cannot be given with --init-weights: the architecture is the weights'")
        if context.get_parameter_source("lr") is ParameterSource.DEFAULT:
            kwargs["lr"] = FINE_TUNE_LR
    fields = {field.name for field in dataclasses.fields(TrainingRecipe)}
    recipe = TrainingRecipe(**{key: kwargs.pop(key) for key in list(kwargs) if key in fields})
    weights = train_phase(
        phase,
        prep_dir,
        model_out,
        recipe,
        subjects=list(subjects) or None,
        extra_prep_dirs=list(extra_prep_dirs) or None,
        **kwargs,
    )
    click.echo(f"weights: {weights}")


@cli.command()
@training_options
@click.option(
    "--skull-strip-prob",
    type=click.FloatRange(min=0.0, max=1.0),
    default=DEFAULT.skull_strip_prob,
    show_default=True,
    help="This fraction of training slices is skull-stripped (zeroed outside the teacher's "
    "brain mask grown by 0-6 mm, re-normalised), so that brain-extracted T1w images "
    "work too. 0: none.",
)
@exits_cleanly
def phase1(prep_dir: Path, model_out: Path, **kwargs) -> None:
    """Train the T1w -> DTI translator on PREP_DIR's pairs; write MODEL_OUT/phase1.safetensors.

    Every default is the recipe of the shipped weights (see their model card).

    \b
    Logs: MODEL_OUT/phase1_losses.csv; checkpoints: MODEL_OUT/checkpoints/.
    Several GPUs: torchrun --nproc_per_node 4 -m m2m_app.cli.train phase1 ...
    Fine-tune the shipped weights on your data: --init-weights packaged.
    """
    _train("phase1", prep_dir, model_out, **kwargs)


@cli.command()
@training_options
@click.option(
    "--predicted-inputs",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Folder of phase-1 predictions (from `m2m-train predict`) used as extra inputs, "
    "so phase 2 also learns on what it will see at inference.",
)
@exits_cleanly
def phase2(prep_dir: Path, model_out: Path, **kwargs) -> None:
    """Train the DTI -> tractography-slice translator; write MODEL_OUT/phase2.safetensors.

    Every default is the recipe of the shipped weights (see their model card).
    """
    _train("phase2", prep_dir, model_out, **kwargs)


@cli.command()
@click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Folder with phase1.safetensors (default: the packaged weights).",
)
@click.option("--subject", "subjects", multiple=True, help="Only these subjects. Repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@with_verbosity
@exits_cleanly
def predict(
    prep_dir: Path,
    out_dir: Path,
    weights_dir: Path | None,
    subjects: tuple[str, ...],
    device: str,
    verbose: int,
    quiet: int,
) -> None:
    """Write phase-1 predicted FA/MD/colour-FA for PREP_DIR's subjects into OUT_DIR (prep layout)."""
    from m2m_app.training.evaluate import write_phase1_predictions

    setup_logging(verbose, quiet)
    writable_dir(out_dir, "output folder")
    write_phase1_predictions(prep_dir, out_dir, weights_dir, list(subjects) or None, device)


@cli.command()
@held_out_scoring()
@click.option(
    "--train-subject", "train_subjects", multiple=True, help="Subjects the baseline is fitted on (default: all others)."
)
@click.option(
    "--skull-strip",
    is_flag=True,
    help="Phase 1: score on the T1w skull-stripped with the teacher's brain mask (grown by 3 mm), "
    "as a brain-extracted input would be.",
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    type=click.Choice(["intensity", "atlas", "grid"]),
    default=("intensity",),
    show_default=True,
    help="Phase 1: baseline(s) scored with m2m; repeatable. intensity: FA from T1w intensity "
    "(fitted on the training subjects); atlas: TractSeg's HCP FA template warped to the T1w "
    'through nilearn\'s MNI152 T1 with ANTs SyN (needs: pip install "m2m-app[atlas]"); grid: not a '
    "baseline but the ceiling of m2m's model grid, the teacher's own FA resampled onto it and back.",
)
@click.option(
    "--out", "out_tsv", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table as TSV here."
)
@with_verbosity
@exits_cleanly
def evaluate(
    prep_dir: Path,
    weights_dir: Path | None,
    phase: str,
    test_subjects: tuple[str, ...],
    train_subjects: tuple[str, ...],
    predicted_inputs: Path | None,
    skull_strip: bool,
    baselines: tuple[str, ...],
    out_tsv: Path | None,
    device: str,
    verbose: int,
    quiet: int,
) -> None:
    """Score a translator (WEIGHTS_DIR, default: packaged) on held-out subjects against baselines.

    Follows the evaluation protocol of docs/training.md: 3D maps on the T1w grid inside the
    teacher's brain mask ∩ the measured DWI field of view. Prints one row per subject and
    method (m2m, baseline_*) with FA MAE / r / bias / spread / PSNR / SSIM, MD MAE / r and
    V1 angular error, in brain and white matter (phase 1), or TDI Pearson r / Dice and
    direction error (phase 2).
    """
    from m2m_app.training.evaluate import evaluate_phase

    setup_logging(verbose, quiet)
    rows = evaluate_phase(
        f"phase{phase}",
        prep_dir,
        weights_dir,
        list(test_subjects),
        list(train_subjects) or None,
        out_tsv,
        device,
        predicted_inputs,
        skull_strip,
        baselines,
    )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    click.echo("\t".join(columns))
    for row in rows:
        click.echo(
            "\t".join(
                f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns
            )
        )


@cli.command()
@held_out_scoring(test_subject_required=False)
@click.option(
    "--scale-from",
    "scale_from",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Summary table (--out) of another fold; the scale applied is the median of their fitted "
    "scales (default: the one stored with the weights, else 1). Repeatable.",
)
@click.option(
    "--store-scale",
    is_flag=True,
    help="Write the applied scale into WEIGHTS_DIR/phase<N>.json (uncertainty_scale); needs --scale-from.",
)
@click.option(
    "--out",
    "out_tsv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the summary as TSV here and the reliability table beside it (<stem>_reliability.tsv).",
)
@with_verbosity
@exits_cleanly
def calibrate(
    prep_dir: Path,
    weights_dir: Path | None,
    phase: str,
    test_subjects: tuple[str, ...],
    scale_from: tuple[Path, ...],
    store_scale: bool,
    predicted_inputs: Path | None,
    out_tsv: Path | None,
    device: str,
    verbose: int,
    quiet: int,
) -> None:
    """Check the uncertainty maps of a translator (WEIGHTS_DIR) against its error on held-out subjects.

    Prints one row per subject and map (fa_sd, v1_dispersion; tdi_sd for phase 2): the
    Spearman correlation of uncertainty and error, the coverage of +-1 and +-2 (scaled)
    uncertainties, raw and with the applied scale, and the scale fitted on this subject.
    Without --test-subject, --store-scale --scale-from only stores the folds' pooled scale
    (for weights trained on every subject, which have no held-out one).
    """
    from m2m_app.training.calibration import PHASE_MAPS, calibrate_phase, scales_from_tables, store_scales

    setup_logging(verbose, quiet)
    if not test_subjects:
        if not (store_scale and scale_from):
            raise click.UsageError("give --test-subject, or --store-scale with --scale-from")
        scales = scales_from_tables(list(scale_from), PHASE_MAPS[f"phase{phase}"])
        click.echo(f"stored {scales} in {store_scales(weights_dir, f'phase{phase}', scales)}")
        return
    summary, _ = calibrate_phase(
        f"phase{phase}",
        prep_dir,
        weights_dir,
        list(test_subjects),
        list(scale_from) or None,
        out_tsv,
        device,
        predicted_inputs,
        store_scale,
    )
    columns = list(summary[0])
    click.echo("\t".join(columns))
    for row in summary:
        click.echo("\t".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns))


@cli.command("fit-detail")
@click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("weights_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--subject",
    "subjects",
    multiple=True,
    help="Fit on these units (default: the ones the phase-1 weights were trained on). Repeatable.",
)
@click.option("--sigma-mm", type=click.FloatRange(min=0.5), default=FA_DETAIL_SIGMA_MM, show_default=True)
@click.option("--weight", type=click.FloatRange(min=0.0), default=FA_DETAIL_WEIGHT, show_default=True)
@with_verbosity
@exits_cleanly
def fit_detail(
    prep_dir: Path,
    weights_dir: Path,
    subjects: tuple[str, ...],
    sigma_mm: float,
    weight: float,
    verbose: int,
    quiet: int,
) -> None:
    """Fit and store the T1w detail transfer of the phase-1 weights in WEIGHTS_DIR.

    The predicted FA gains, on the T1w's own grid, WEIGHT times the high-pass (Gaussian
    SIGMA_MM) of FA looked up from the T1w intensity; the lookup (mean teacher FA per
    intensity bin) is fitted here on the training units' teacher maps in PREP_DIR. The app,
    evaluate and calibrate then apply it. --weight 0 turns it off. The defaults are the ones
    chosen on the leave-one-person-out folds (docs/benchmarks.md).
    """
    from m2m_app.training.detail import fit_fa_detail

    setup_logging(verbose, quiet)
    fit_fa_detail(prep_dir, weights_dir, list(subjects) or None, sigma_mm, weight)


#: ``--subject`` of the commands that compare the app's outputs with the teacher's.
present_in_both = click.option(
    "--subject",
    "subjects",
    multiple=True,
    required=True,
    help="Subject(s) present in both (sub-01 or sub-01_ses-a). Repeatable.",
)


@cli.command("evaluate-tractogram")
@click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("m2m_output_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@present_in_both
@with_verbosity
@exits_cleanly
def evaluate_tractogram(
    prep_dir: Path, m2m_output_dir: Path, subjects: tuple[str, ...], verbose: int, quiet: int
) -> None:
    """Compare the app's tractogram (from the T1w alone) with the teacher's (from the DWI).

    Prints TDI correlation, Dice of visited voxels, the fraction of predicted streamlines
    within 2 mm of a teacher streamline and vice versa, and, on the teacher's Desikan-Killiany
    parcellation (written by prepare): the correlation of the two connectomes' edge weights
    (streamline counts, upper triangle; and of log(1 + count)) and the mean relative difference
    of region FA (n/a for a prep dir prepared before parcellations existed).
    """
    from dipy.io.streamline import load_tractogram

    from m2m_app.errors import MissingInputError
    from m2m_app.io.manifest import select_rows
    from m2m_app.io.naming import Subject, derivative_paths
    from m2m_app.io.nifti import load_image
    from m2m_app.training.evaluate import connectome_metrics, tractogram_metrics

    setup_logging(verbose, quiet)
    connectome_columns = (
        "edge_r",
        "edge_r_log",
        "assigned_fraction",
        "region_fa_rel_diff",
        "region_fa_r",
        "regions_compared",
    )
    click.echo(
        "subject\ttdi_r_brain\tvisited_dice\tpredicted_near_teacher\tteacher_near_predicted\tn_predicted\tn_teacher\t"
        + "\t".join(connectome_columns)
    )
    for row, prep in select_rows([prep_dir], list(subjects)):
        subject = Subject(row["participant"], row["session"] or None)
        ours = next(
            (
                p
                for fmt in ("trx", "tck", "trk")
                if (p := derivative_paths(m2m_output_dir, subject, "nerf", fmt)["tractogram"]).exists()
            ),
            None,
        )
        if ours is None:
            raise MissingInputError(f"{subject.label}: no m2m tractogram in {m2m_output_dir}")
        reference, _ = load_image(row["t1w"])
        brain = load_image(prep / row["mask"])[1] > 0
        load = lambda path: list(load_tractogram(str(path), reference, bbox_valid_check=False).streamlines)  # noqa: E731
        x, y, z = reference.shape[:3]
        predicted = load(ours)
        metrics = tractogram_metrics(predicted, load(prep / row["tractogram"]), (x, y, z), reference.affine, brain)
        try:
            fa = derivative_paths(m2m_output_dir, subject, "nerf")["fa"]
            metrics |= connectome_metrics(predicted, fa, prep, subject, "DesikanKilliany")
        except MissingInputError as err:
            LOGGER.warning("%s", err)
            metrics |= dict.fromkeys(connectome_columns, float("nan"))
        click.echo("\t".join([row["subject"], *("n/a" if v != v else f"{v:.4g}" for v in metrics.values())]))


@cli.command("evaluate-regions")
@click.argument("prep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("m2m_output_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@present_in_both
@with_verbosity
@exits_cleanly
def evaluate_regions(prep_dir: Path, m2m_output_dir: Path, subjects: tuple[str, ...], verbose: int, quiet: int) -> None:
    """Compare the app's region FA (from the T1w alone) with the teacher's (from the DWI).

    On the teacher's Desikan-Killiany parcellation (written by prepare, limited to the DWI's field
    of view): the mean relative difference of the region means and their correlation. Needs only
    the app's FA map (e.g. a run with --skip-phase2).
    """
    from m2m_app.errors import MissingInputError
    from m2m_app.io.manifest import select_rows
    from m2m_app.io.naming import Subject, derivative_paths
    from m2m_app.training.evaluate import region_fa_metrics

    setup_logging(verbose, quiet)
    click.echo("subject\tregion_fa_rel_diff\tregion_fa_r\tregions_compared")
    for row, prep in select_rows([prep_dir], list(subjects)):
        subject = Subject(row["participant"], row["session"] or None)
        fa = derivative_paths(m2m_output_dir, subject, "nerf")["fa"]
        if not fa.exists():
            raise MissingInputError(f"{subject.label}: no m2m FA map in {m2m_output_dir}")
        metrics = region_fa_metrics(fa, prep, subject, "DesikanKilliany")
        click.echo("\t".join([row["subject"], *(f"{v:.4g}" for v in metrics.values())]))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``m2m-train`` console script (usage errors exit with 64)."""
    run_click(cli, list(sys.argv[1:] if argv is None else argv), "m2m-train")


if __name__ == "__main__":
    main()
