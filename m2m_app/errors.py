"""User-facing errors and the exit codes of the BIDS-Apps execution draft (sysexits)."""

from __future__ import annotations

#: Exit codes, after ``sysexits.h`` as the BIDS Apps execution draft recommends.
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_CANTCREAT = 73


class M2MError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = EX_FAILURE


class UsageError(M2MError):
    """Wrong command-line arguments (e.g. output folder equal to the input folder)."""

    exit_code = EX_USAGE


class BadDataError(M2MError):
    """An input file exists but cannot be used (4D T1w, NaNs, truncated gzip, bad bvecs...)."""

    exit_code = EX_DATAERR


class MissingInputError(M2MError):
    """A required input is absent (no T1w, unknown participant label, missing .bval)."""

    exit_code = EX_NOINPUT


class OutputError(M2MError):
    """The output or work folder cannot be created or written."""

    exit_code = EX_CANTCREAT
