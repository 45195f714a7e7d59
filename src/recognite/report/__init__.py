"""Reports: figures (PNG) and one self-contained HTML page about a trained checkpoint.

``build_report(run_dir)`` re-embeds the run's validation split with a checkpoint and writes
``run_dir/report/report.html`` with PR and CMC curves, score histograms with the open-set
threshold, the worst queries next to what they retrieved, the most-confused labels and per-label
AP. Figures need the optional dependency matplotlib (``pip install 'recognite[plot]'``).
"""

from recognite.report._data import ReportData, compute_report_data
from recognite.report.build import build_report

__all__ = ["ReportData", "build_report", "compute_report_data"]
