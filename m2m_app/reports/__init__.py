"""Visual reports: per-subject HTML pages and the group QC table."""
