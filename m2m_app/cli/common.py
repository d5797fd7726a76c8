"""What both command lines share: logging, error reporting, output checks, running Nipype."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import click
import yaml

from m2m_app.errors import EX_FAILURE, M2MError, OutputError, UsageError
from m2m_app.io.naming import Subject

Inputs = TypeVar("Inputs")

LOGGER = logging.getLogger("m2m")


def _library_level(level: int) -> int:
    """Log level of chatty libraries (Nipype, bidsschematools) for m2m's ``level``: warnings and
    errors only; m2m logs the stages itself."""
    return max(level, logging.WARNING)


def setup_logging(verbose: int, quiet: int) -> None:
    """Log to stderr at WARNING/INFO/DEBUG from ``-q``/default/``-v``; Nipype is kept quieter."""
    level = max(logging.DEBUG, logging.INFO - 10 * verbose + 10 * quiet)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        nipype_logger = logging.getLogger(name)  # Nipype prints through its own handler
        nipype_logger.setLevel(_library_level(level))
        nipype_logger.propagate = False
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR if level > logging.DEBUG else logging.DEBUG)
    logging.getLogger("bidsschematools").setLevel(_library_level(level))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, ``docker stop``), raised in the main process to stop cleanly."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def exits_cleanly(func):
    """Turn :class:`M2MError` into a one-line message and its exit code (no traceback).

    SIGINT and SIGTERM stop the run the same way: temporary files are removed, finished
    stages stay in the work folder, and the exit code is 130 (SIGINT) or 143 (SIGTERM).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return func(*args, **kwargs)
        except M2MError as err:
            click.echo(f"m2m: error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            what = "terminated" if isinstance(err, Terminated) else "interrupted"
            click.echo(f"m2m: {what}; re-run the same command to resume", err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT))

    return wrapper


#: Options that take a space-separated list, as the BIDS-Apps spec writes them.
LIST_OPTIONS = ("--participant-label", "--participant_label", "--session-label", "--output-spaces", "--atlases")


def expand_list_options(argv: list[str]) -> list[str]:
    """``--participant-label 01 02`` → ``--participant-label 01 --participant-label 02`` (click's form)."""
    out, current = [], None
    for token in argv:
        if token in LIST_OPTIONS:
            current = "--participant-label" if "participant" in token else token
            continue
        if current and not token.startswith("-"):
            out += [current, token]
            continue
        if current and out[-2:-1] != [current]:
            raise click.UsageError(f"{current} needs at least one label")
        current = None
        out.append(token)
    if current and out[-2:-1] != [current]:
        raise click.UsageError(f"{current} needs at least one label")
    return out


def run_click(command: click.Command, argv: list[str], prog_name: str) -> None:
    """Run a click command so that usage errors exit with 64 (BIDS-Apps/sysexits), not click's 2.

    List options are expanded first (:func:`expand_list_options`), so ``m2m`` and every
    ``m2m-train`` command take ``--participant-label 01 02`` alike.
    """
    from m2m_app.errors import EX_USAGE

    try:
        result = command.main(expand_list_options(argv), prog_name=prog_name, standalone_mode=False)
    except click.UsageError as err:
        err.show()
        sys.exit(EX_USAGE)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(EX_FAILURE)
    sys.exit(result if isinstance(result, int) else 0)


def _is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies below it (both resolved: symbolic links followed)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def check_location(path: Path, what: str, bids_dir: Path, suggested: str | None = None) -> None:
    """Refuse ``path`` as the input dataset ``bids_dir`` or a folder inside it.

    With ``suggested`` (a pipeline folder name such as ``m2m``), a folder *below*
    ``BIDS_DIR/derivatives/`` is accepted, at any depth: the layout the BIDS specification
    recommends for derivatives (``BIDS_DIR/derivatives/m2m``), which pybids does not index as
    raw data. The message names ``BIDS_DIR/derivatives/<suggested>``. Without it (work
    folders), the whole dataset is refused, as fMRIPrep does.
    """
    root = Path(bids_dir).resolve()
    if not _is_inside(path, root):
        return
    resolved = Path(path).resolve()
    if suggested is not None:
        if root / "derivatives" in resolved.parents:
            return
        raise UsageError(
            f"the {what} {path} must not be the input dataset or inside it ({root}), except below its "
            f"derivatives/ folder: use {root / 'derivatives' / suggested} (the BIDS layout) or a folder "
            "outside the dataset"
        )
    raise UsageError(f"the {what} {path} must not be inside the input dataset ({root}): choose a folder outside it")


def work_dir_outside(candidate: Path, bids_dir: Path) -> Path:
    """The default work folder: ``candidate`` where it lies outside the dataset ``bids_dir``, else
    ``BIDS_DIR/../m2m_work/<dataset folder name>`` (an output below ``BIDS_DIR/derivatives/``
    must not bring Nipype's files into the dataset, where a BIDS validator would read them)."""
    if not _is_inside(candidate, bids_dir):
        return Path(candidate).absolute()
    bids_dir = Path(bids_dir).absolute()
    return bids_dir.parent / "m2m_work" / bids_dir.name


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check it is writable (see :func:`check_location` for where)."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the {what} {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"the {what} {path} is not writable")
    return path


#: Where the kernel mounts the control groups (cgroup v2's unified tree, or v1's controllers below it).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """This process's cgroup path per controller (``""`` for cgroup v2's unified tree), from ``/proc/self/cgroup``."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    return paths


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs that the CPU quota of this process's control group allows (``docker --cpus``, Kubernetes,
    systemd's CPUQuota), or None without a quota: cgroup v2's ``cpu.max`` or v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, in the process's own group or at the root."""
    paths = _cgroup_paths(proc_cgroup)
    for folder in dict.fromkeys([root / paths.get("", ""), root]):
        try:
            limit, interval = (folder / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        return None if limit == "max" else int(limit) / int(interval)
    for folder in dict.fromkeys([root / "cpu" / paths.get("cpu", ""), root / "cpu"]):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity mask (``taskset``, SLURM's ``--cpus-per-task``), further
    limited by its control group's CPU quota (rounded up), as in containers; at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(root, proc_cgroup)
    return max(1, min(count, math.ceil(quota)) if quota else count)


def plugin_settings(nprocs: int | None, mem_mb: int | None, plugin_file: Path | None) -> dict:
    """Nipype plugin and its arguments: MultiProc by default, or what ``--use-plugin`` YAML says.

    The YAML follows fMRIPrep's: ``plugin: SLURM`` and ``plugin_args: {...}``.
    """
    if plugin_file is not None:
        try:
            settings = yaml.safe_load(Path(plugin_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"{plugin_file}: unreadable plugin file: {err}") from None
        if not isinstance(settings, dict) or "plugin" not in settings:
            raise UsageError(f"{plugin_file}: a plugin file needs a 'plugin:' key")
        settings.setdefault("plugin_args", {})
    else:
        # forkserver, as fMRIPrep does: a worker forked from a process whose torch/OpenMP
        # thread pool is running can deadlock.
        settings = {
            "plugin": "MultiProc",
            "plugin_args": {"raise_insufficient": False, "maxtasksperchild": 1, "mp_context": "forkserver"},
        }
    if settings["plugin"] == "MultiProc":
        settings["plugin_args"]["n_procs"] = nprocs or available_cpus()
        if mem_mb:
            settings["plugin_args"]["memory_gb"] = mem_mb / 1024
    if nprocs == 1 and plugin_file is None:
        settings = {"plugin": "Linear", "plugin_args": {}}
    return settings


def _configure_nipype_workers(work_dir: Path) -> None:
    """Give Nipype in the worker processes the log levels set by :func:`setup_logging`.

    Workers started by ``forkserver`` import Nipype afresh and read its configuration file
    from ``NIPYPE_CONFIG_DIR``; one is written into the work folder.
    """
    from m2m_app.io.files import atomic_write

    level = logging.getLevelName(_library_level(logging.getLogger().getEffectiveLevel()))
    text = "[logging]\n" + "".join(f"{kind}_level = {level}\n" for kind in ("workflow", "interface", "utils"))
    folder = Path(work_dir) / "nipype_config"
    atomic_write(folder / "nipype.cfg", lambda tmp: Path(tmp).write_text(text))
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)


#: Modules the forkserver imports once (torch, dipy, matplotlib, Nipype and m2m's nodes), so that
#: each node's worker process, forked from it for one task (``maxtasksperchild`` 1), starts with
#: them instead of importing them again; importing runs no thread pool, so forking stays safe.
WORKER_PRELOAD = (
    "nipype.pipeline.engine",
    "dipy.reconst.dti",
    "m2m_app.inference.predict",
    "m2m_app.tractography.views",
    "m2m_app.io.derivatives",
    "m2m_app.io.tractogram",
    "m2m_app.reports.figures",
    "m2m_app.reports.subject",
)
#: Seconds between two looks of MultiProc's scheduler at its workers (Nipype's default 2 s left
#: each stage's successor waiting about 1 s); other plugins (SLURM, SGE) keep their own.
MULTIPROC_POLL_S = 0.1


def run_workflow(workflow, settings: dict, stop_on_first_crash: bool, status_callback=None) -> bool:
    """Run a Nipype workflow; return False when some node crashed (the others still ran).

    ``status_callback(node, status)`` is handed to the plugin (e.g. a
    :class:`~m2m_app.workflows.timing.StageTimer`).
    """
    import multiprocessing

    _configure_nipype_workers(Path(workflow.base_dir))
    workflow.config["execution"].update(
        {"stop_on_first_crash": stop_on_first_crash, "crashfile_format": "txt", "remove_unnecessary_outputs": False}
    )
    if settings["plugin"] == "MultiProc":
        workflow.config["execution"]["poll_sleep_duration"] = MULTIPROC_POLL_S
        if settings["plugin_args"].get("mp_context") == "forkserver":
            multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__", *WORKER_PRELOAD])
    plugin_args = dict(settings["plugin_args"])
    if status_callback is not None:
        plugin_args["status_callback"] = status_callback
    try:
        workflow.run(plugin=settings["plugin"], plugin_args=plugin_args)
    except RuntimeError as err:
        LOGGER.debug("workflow reported: %s", err)
        return False
    return True


def collect_units(
    subjects: Iterable[Subject], find: Callable[[Subject], Inputs | None]
) -> tuple[dict[Subject, Inputs], dict[str, M2MError]]:
    """Each unit's inputs, as ``find(subject)`` returns them, and the units that failed.

    ``find`` returns the unit's inputs, None to skip the unit silently, or raises
    :class:`M2MError` (missing or bad data): those units are returned by label with their
    error, whose ``exit_code`` the run's exit code takes (see :func:`exit_code_for`).
    """
    units, failures = {}, {}
    for subject in subjects:
        try:
            inputs = find(subject)
        except M2MError as err:
            failures[subject.label] = err
            continue
        if inputs is not None:
            units[subject] = inputs
    return units, failures


def echo_failures(prog_name: str, failures: dict[str, str]) -> None:
    """``<prog>: <label> FAILED: <message>`` on stderr for each failed unit, sorted by label."""
    for label, message in sorted(failures.items()):
        click.echo(f"{prog_name}: {label} FAILED: {message}", err=True)


def exit_code_for(codes: set[int], workflow_ok: bool = True) -> int:
    """The exit code once every participant ran: 0 if none failed, the failures' common code
    if they share one (e.g. 65 for bad data), else 1."""
    if not workflow_ok:
        codes = codes | {EX_FAILURE}
    if not codes:
        return 0
    return codes.pop() if len(codes) == 1 else EX_FAILURE


def write_citation(output_dir: Path, workflow) -> Path:
    """Write the workflow's methods text (its ``__desc__`` boilerplate) to ``OUTPUT_DIR/logs/CITATION.md``."""
    from m2m_app import __version__
    from m2m_app.io.files import atomic_write

    text = "# Methods (generated by m2m {})\n\n{}\n".format(__version__, workflow.visit_desc().strip())
    return atomic_write(Path(output_dir) / "logs" / "CITATION.md", lambda tmp: Path(tmp).write_text(text))
