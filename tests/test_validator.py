"""The derivatives of the embedded example pass the BIDS validator except for the documented names
it does not know yet, load in pybids by entity, and describe themselves (README, Authors, links)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest
from bids import BIDSLayout

from conftest import make_bids
from m2m_app.io.derivatives import NOT_BIDS, dataset_description

DOCS = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"


def documented_unknown_names() -> list[re.Pattern]:
    """The file-name patterns docs/outputs.md lists as valid but unknown to the validator, as regular
    expressions on the validator's root-relative paths (``*``: within a folder, ``**/``: any folders,
    ``{a,b}``: either)."""
    text = DOCS.read_text()
    section = text[text.index("<!-- validator-unknown-names -->") : text.index("<!-- /validator-unknown-names -->")]
    globs = re.findall(r"^- `([^`]+)`", section, flags=re.M)
    assert globs, "docs/outputs.md lists no names"
    return [
        re.compile(
            "^/"
            + re.escape(g)
            .replace(r"\*\*/", "(?:[^/]+/)*")
            .replace(r"\*", "[^/]*")
            .replace(r"\{", "(?:")
            .replace(r"\}", ")")
            .replace(",", "|")
            + "$"
        )
        for g in globs
    ]


def _validate(folder: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``({error key: root-relative paths}, [warnings])`` of npm's legacy ``bids-validator`` (1.x) on
    ``folder``; without it, the Python ``bids-validator`` package's file-name rules (same rules, no
    dataset-level checks, so no warnings), with the ``.bidsignore`` patterns applied here."""
    if shutil.which("bids-validator"):
        version = subprocess.run(["bids-validator", "--version"], capture_output=True, text=True).stdout.strip()
        assert version.startswith("1."), f"expected the legacy 1.x validator, found {version}"
        done = subprocess.run(
            ["bids-validator", str(folder), "--json", "--verbose"], capture_output=True, text=True, timeout=600
        )
        issues = json.loads(done.stdout)["issues"]
        rejected: dict[str, set[str]] = {}
        for error in issues["errors"]:
            rejected.setdefault(error["key"], set()).update(
                (entry.get("file") or {}).get("relativePath") for entry in error["files"]
            )
        return rejected, [f"{w['key']}: {w['reason']}" for w in issues["warnings"]]
    from bids_validator import BIDSValidator

    validator, ignored = BIDSValidator(), (folder / ".bidsignore").read_text().split()
    rejected = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        parts = path.relative_to(folder).parts
        if any(fnmatch(parts[-1], pattern) or pattern.rstrip("/") in parts[:-1] for pattern in ignored):
            continue
        relative = "/" + "/".join(parts)
        if not validator.is_bids(relative):
            rejected.add(relative)
    return ({"NOT_INCLUDED": rejected} if rejected else {}), []


@pytest.mark.slow
def test_example_derivatives_pass_the_validator_but_for_the_documented_names(example_outputs):
    _, out = example_outputs
    rejected, warnings = _validate(out)
    assert not warnings, warnings
    assert set(rejected) <= {"NOT_INCLUDED", "NO_VALID_DATA_FOUND_FOR_SUBJECT"}, rejected
    allowed = documented_unknown_names()
    undocumented = {p for p in rejected["NOT_INCLUDED"] if not any(r.match(p) for r in allowed)}
    assert not undocumented, undocumented
    assert any(p.endswith("_dwimap.nii.gz") for p in rejected["NOT_INCLUDED"])  # the names are still checked
    # a subject folder is flagged only because every file in it is one of those names
    subjects = {p.split("/")[1] for p in rejected["NOT_INCLUDED"]}
    assert rejected.get("NO_VALID_DATA_FOUND_FOR_SUBJECT", set()) <= {f"/{s}" for s in subjects}


@pytest.mark.slow
def test_example_derivatives_describe_themselves(example_outputs):
    example, out = example_outputs
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["Authors"] == json.loads((example / "dataset_description.json").read_text())["Authors"]
    names = [g["Name"] for g in description["GeneratedBy"]]
    assert names[0] == "m2m" and "m2m phase1 translator weights" in names and "m2m phase2 translator weights" in names
    sidecar = json.loads(next((out / "sub-MNI152" / "dwi").glob("*_space-T1w_*_param-fa_dwimap.json")).read_text())
    for phase in ("phase1", "phase2"):
        entry = description["GeneratedBy"][names.index(f"m2m {phase} translator weights")]
        assert sidecar["Weights"][phase]["sha256"] in entry["Description"]
    assert description["DatasetLinks"]["raw"] == example.resolve().as_uri() == description["SourceDatasets"][0]["URL"]
    readme = (out / "README").read_text()
    assert "predicted by m2m from the T1-weighted image alone" in readme and "logs/CITATION.md" in readme
    card = re.search(r"Model card .*: (\S+)", readme).group(1)
    assert Path(card).is_file() and (out / "logs" / "CITATION.md").is_file()
    assert (out / ".bidsignore").read_text().split() == list(NOT_BIDS)


@pytest.mark.slow
def test_example_derivatives_load_in_pybids_by_entity(example_outputs):
    example, out = example_outputs
    layout = BIDSLayout(str(example), validate=False, derivatives=str(out))
    maps = layout.get(scope="derivatives", subject="MNI152", suffix="dwimap", extension=".nii.gz", return_type="file")
    on_disk = sorted(str(p) for p in (out / "sub-MNI152" / "dwi").glob("*_dwimap.nii.gz"))
    assert sorted(maps) == on_disk and len(on_disk) >= 9
    for path in on_disk:  # every map is found again from the entities pybids reads in its name
        entities = layout.parse_file_entities(path)
        assert entities["space"] in ("T1w", "MNI152NLin2009aSym") and entities["datatype"] == "dwi"
        assert entities.get("res") == (None if entities["space"] == "T1w" else "2")
        assert path in layout.get(scope="derivatives", return_type="file", **entities)
    transforms = layout.get(scope="derivatives", subject="MNI152", suffix="xfm", extension=".h5", return_type="file")
    assert {Path(p).name for p in transforms} == {
        "sub-MNI152_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
        "sub-MNI152_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5",
    }
    tensor = layout.get(scope="derivatives", model="tensor", suffix="dwimap", extension=".nii.gz", return_type="file")
    assert {Path(p).name for p in tensor} == {Path(p).name for p in on_disk if "model-tensor" in p}
    masks = layout.get(
        scope="derivatives", subject="MNI152", datatype="anat", suffix="mask", desc="brain", extension=".nii.gz"
    )
    assert len(masks) == 2  # T1w and template space
    assert len(layout.get(scope="derivatives", subject="MNI152", suffix="tractogram", extension=".trx")) == 2
    group = (out / "group_qc.tsv").read_text().splitlines()
    assert group[0].split("\t")[0] == "subject" and group[1].startswith("sub-MNI152\t")


def test_dataset_links_are_normalised_absolute_uris(tmp_path, monkeypatch):
    bids = make_bids(tmp_path / "sub-x" / "perf" / "bids", {})
    (tmp_path / "alias").symlink_to(tmp_path / "sub-x")
    monkeypatch.chdir(tmp_path / "sub-x")
    for given in ("perf/../perf/bids", tmp_path / "alias" / "perf" / "bids", "./perf/bids/"):
        description = json.loads(dataset_description(tmp_path / "out", given).read_text())
        assert description["DatasetLinks"]["raw"] == bids.resolve().as_uri() == description["SourceDatasets"][0]["URL"]
        assert "/../" not in description["DatasetLinks"]["raw"] and "/alias/" not in description["DatasetLinks"]["raw"]
    assert "Authors" not in description  # the source lists none: nothing is made up
    assert [g["Name"] for g in description["GeneratedBy"]] == ["m2m"]  # no phase asked for: no weights entry


@pytest.mark.slow
def test_example_connectome_agrees_with_mrtrix3(example_outputs, tmp_path):
    """MRtrix3's tck2connectome on the example's own tractogram and dseg: the same count matrix."""
    from tests.test_regions import mrtrix_count_correlation

    _, out = example_outputs
    r, ours, _ = mrtrix_count_correlation(out / "sub-MNI152", tmp=tmp_path)
    assert r >= 0.95 and ours.sum() > 100
    assert (out / "group_space-T1w_seg-DesikanKilliany_model-tensor_dwimap.tsv").exists()
