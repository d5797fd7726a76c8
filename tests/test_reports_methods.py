"""reports/methods: the references a run cites, as HTML and as BibTeX."""

from __future__ import annotations

import re

from m2m_app.reports.methods import NERF_REFERENCES, REFERENCES, cited, references_html, write_bibtex


def test_references_of_a_run_are_listed_and_written_as_bibtex(tmp_path):
    with_nerf, without = cited(with_nerf=True), cited(with_nerf=False)
    assert set(with_nerf) - set(without) == set(NERF_REFERENCES) and set(with_nerf) <= set(REFERENCES)
    listed = references_html(without)
    assert re.findall(r'<li id="ref-([^"]+)">', listed) == without
    text = write_bibtex(tmp_path / "logs" / "CITATION.bib", with_nerf).read_text()
    assert re.findall(r"^@\w+\{([^,]+),", text, flags=re.MULTILINE) == with_nerf
