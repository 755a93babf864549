"""The PLR experiment grid (grid.py): methods x train bits x restore bits x tasks, and its reports and plot
(report.py)."""
