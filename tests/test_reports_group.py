"""reports/group without a browser: outliers, the QC table, its page and strip plot."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from m2m_app.errors import MissingInputError
from m2m_app.io.naming import Subject
from m2m_app.reports.group import numeric_columns, outliers, write_group_outputs
from m2m_app.reports.viewer import viewer_data_path


def test_outliers_are_robust_z_scores_above_three():
    values = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 5.0, np.nan])
    assert outliers(values).tolist() == [False] * 5 + [True, False]  # NaN is never flagged
    assert not outliers(np.array([1.0, 100.0, np.nan])).any()  # fewer than 3 finite values
    assert outliers(np.array([2.0, 2.0, 2.0, 2.5])).tolist() == [False, False, False, True]  # zero spread


def test_numeric_columns_leave_out_text_and_booleans():
    rows = [{"subject": "sub-01", "fa": 0.4, "ok": True, "n": None}, {"subject": "sub-02", "n": 3}]
    assert numeric_columns(rows, ["subject", "fa", "ok", "n"]) == ["fa", "n"]


def test_group_outputs_table_page_and_plot(tmp_path):
    with pytest.raises(MissingInputError, match="run the participant level first"):
        write_group_outputs(tmp_path)
    for i, fa in enumerate([0.40, 0.41, 0.39, 0.40, 0.95]):
        unit = Subject(f"{i + 1:02d}")
        row = {"subject": unit.label, "mean_fa": fa, **({"note": "rerun"} if i == 0 else {})}
        (tmp_path / unit.label).mkdir()
        (tmp_path / unit.label / f"{unit.label}_desc-m2m_qc.json").write_text(json.dumps(row))
    viewer = viewer_data_path(tmp_path, Subject("02"))  # only sub-02's report has a viewer
    viewer.parent.mkdir(parents=True)
    viewer.write_text("window.m2mViewerData = {};")
    regions = tmp_path / "group_space-T1w_seg-DesikanKilliany_model-tensor_dwimap.tsv"
    tsv = write_group_outputs(tmp_path, regions=[regions])
    lines = tsv.read_text().splitlines()
    assert lines[0] == "subject\tmean_fa\tnote" and lines[1] == "sub-01\t0.4\trerun" and lines[2].endswith("\tn/a")
    page = (tmp_path / "group.html").read_text()
    assert re.findall(r'<td class="outlier">([^<]*)</td>', page) == ["0.95"]
    assert page.count('<a href="sub-0') == 5 and '<img src="figures/group_qc.svg"' in page
    assert re.findall(r'<a class="viewer" href="([^"]+)">viewer</a>', page) == ["sub-02.html#viewer"]
    assert "<h2>Regions</h2>" in page and f'<a href="{regions.name}">' in page
    svg = (tmp_path / "figures" / "group_qc.svg").read_text()
    assert "sub-05" in svg and "sub-04" not in svg  # only the outlier is labelled
