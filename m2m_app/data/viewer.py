"""The JavaScript of the report's viewer, shipped in the package (nothing is fetched when a report is viewed).

:data:`NIIVUE_BUNDLE` is NiiVue (BSD-2-Clause, github.com/niivue/niivue) built as one classic
script by ``scripts/niivue/build.sh``; ``niivue.json`` beside it records its version, licence,
the packages it bundles and its SHA-256, and ``NIIVUE_LICENSE.txt`` / ``THIRD_PARTY_LICENSES.txt``
hold their licence texts (also at the top of the bundle). :data:`VIEWER_SCRIPT` is m2m's own code
that drives NiiVue in the page.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Folder of the NiiVue bundle, its record and its licences.
NIIVUE_DIR = Path(__file__).resolve().parent / "niivue"
#: NiiVue as one minified classic script (global ``niivue``).
NIIVUE_BUNDLE = NIIVUE_DIR / "niivue.min.js"
#: m2m's viewer code, inlined in each report page.
VIEWER_SCRIPT = Path(__file__).resolve().parent / "report_viewer.js"


def niivue_record() -> dict:
    """What :data:`NIIVUE_BUNDLE` is: ``package``, ``version``, ``license``, ``sha256``, ``bytes``,
    ``bundled`` (name, version, licence of each npm package in it) and how it was built."""
    return json.loads((NIIVUE_DIR / "niivue.json").read_text())
