"""Experiment reports: one self-contained HTML page per run directory (or a comparison of several).

``dust report RUN_DIR [RUN_DIR ...]`` and the end of ``dust train`` call :func:`write_report`.
"""

from dust.report.html import write_report

__all__ = ["write_report"]
