"""Reports: the tables and figures of a grid or run folder (report.py), docs/reliability.md (reliability_report.py)."""
