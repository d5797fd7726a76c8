"""Standard templates that install offline, and the ``--output-spaces`` syntax (fMRIPrep's).

The one template shipped today is nilearn's copy of the ICBM 2009a nonlinear symmetric MNI152
T1w (``mni_icbm152_t1_tal_nlin_sym_09a``, 1 mm, brain-extracted, BSD-3 packaging of the ICBM
licence), offered under its TemplateFlow name ``MNI152NLin2009aSym`` together with nilearn's
grey- and white-matter probability maps of the same template. TemplateFlow itself downloads
its files at run time, which m2m must not do, hence nilearn's copy.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m2m_app.errors import UsageError

#: The space of the outputs on the subject's own T1w grid.
NATIVE_SPACE = "T1w"


@dataclass(frozen=True)
class Template:
    """A template's files (1 mm, RAS) and how to cite it."""

    name: str
    t1w: Path
    gm: Path
    wm: Path
    #: Threshold of the T1w's intensity (0–1 after dividing by its maximum) that gives the brain mask.
    brain_threshold: float
    citation: str
    source: str


def _nilearn_data() -> Path:
    """nilearn's packaged data folder, found without importing nilearn (a second of start-up)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nilearn is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _icbm_2009a_sym() -> Template:
    folder = _nilearn_data()
    return Template(
        name="MNI152NLin2009aSym",
        t1w=folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        gm=folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        wm=folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        brain_threshold=0.2,  # nilearn's load_mni152_brain_mask default
        citation="Fonov et al. (2011) NeuroImage 54(1):313-327; Fonov et al. (2009) NeuroImage 47:S102",
        source="ICBM 2009a nonlinear symmetric MNI152 T1w, as shipped by nilearn (nilearn.datasets, BSD-3)",
    )


#: The templates m2m can write outputs in, by TemplateFlow name: how to build each one's :class:`Template`.
TEMPLATES: dict[str, Callable[[], Template]] = {"MNI152NLin2009aSym": _icbm_2009a_sym}


@dataclass(frozen=True)
class OutputSpace:
    """One entry of ``--output-spaces``: ``T1w``, or a template with an optional ``res`` (mm)."""

    name: str
    resolution: int | None = None

    @property
    def is_template(self) -> bool:
        """Whether this space needs the registration to a template."""
        return self.name != NATIVE_SPACE

    @property
    def entities(self) -> dict[str, str]:
        """The BIDS entities naming a file in this space: ``space`` and, if given, ``res``."""
        return {"space": self.name, **({"res": str(self.resolution)} if self.resolution else {})}

    @property
    def label(self) -> str:
        """The command-line form: ``MNI152NLin2009aSym:res-2``."""
        return self.name + (f":res-{self.resolution}" if self.resolution else "")

    def template(self) -> Template:
        """This space's template (only for :attr:`is_template` spaces)."""
        return TEMPLATES[self.name]()


_SPACE = re.compile(r"^(?P<name>[A-Za-z0-9]+)(?::res-(?P<res>[1-9][0-9]?))?$")


def parse_output_spaces(values: tuple[str, ...] | list[str]) -> tuple[OutputSpace, ...]:
    """``("MNI152NLin2009aSym:res-2", "T1w")`` → output spaces, in order, without repeats.

    fMRIPrep's syntax: a space name, optionally ``:res-N`` (N mm isotropic, as TemplateFlow's
    ``res-1``/``res-2`` of these templates). Empty: ``T1w`` alone. A template that does not
    install offline, or ``res`` on ``T1w`` (use ``--output-resolution``), is a usage error.
    """
    spaces: list[OutputSpace] = []
    for value in [v for item in values for v in item.replace(",", " ").split()] or [NATIVE_SPACE]:
        match = _SPACE.match(value)
        if not match:
            raise UsageError(f"--output-spaces {value!r}: write NAME or NAME:res-N (e.g. MNI152NLin2009aSym:res-2)")
        name, res = match["name"], int(match["res"]) if match["res"] else None
        if name == NATIVE_SPACE:
            if res is not None:
                raise UsageError("--output-spaces T1w takes no res-N: use --output-resolution MM for the T1w space")
        elif name not in TEMPLATES:
            raise UsageError(
                f"--output-spaces {name}: unknown or not installed offline; available: "
                f"{', '.join([NATIVE_SPACE, *TEMPLATES])}"
            )
        space = OutputSpace(name, res)
        if space not in spaces:
            spaces.append(space)
    return tuple(spaces)
