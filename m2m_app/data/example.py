"""The embedded example dataset: nilearn's MNI152 2009 T1w as a one-subject BIDS dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def template_path() -> Path:
    """Path of the ICBM 2009 T1w template installed with nilearn (BSD-3)."""
    from nilearn.datasets import MNI152_FILE_PATH

    return Path(MNI152_FILE_PATH)


def write_example_dataset(target: Path) -> Path:
    """Write ``target/sub-MNI152/anat/sub-MNI152_T1w.nii.gz`` with the BIDS files around it."""
    target = Path(target)
    anat = target / "sub-MNI152" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_path(), anat / "sub-MNI152_T1w.nii.gz")
    (target / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "m2m example: ICBM 2009c MNI152 T1w (as shipped by nilearn)",
                "BIDSVersion": "1.10.0",
                "DatasetType": "raw",
                "License": "see nilearn (BSD-3) and the ICBM 2009 template licence",
                "Authors": [
                    "Vladimir S. Fonov",
                    "Alan C. Evans",
                    "Kelly Botteron",
                    "C. Robert Almli",
                    "Robert C. McKinstry",
                    "D. Louis Collins",
                ],
                "HowToAcknowledge": "Fonov et al. 2011, NeuroImage 54(1); nilearn.",
            },
            indent=2,
        )
    )
    (target / "participants.tsv").write_text("participant_id\nsub-MNI152\n")
    (anat / "sub-MNI152_T1w.json").write_text(json.dumps({"Description": "MNI152 2009 template, 1 mm"}))
    return target
