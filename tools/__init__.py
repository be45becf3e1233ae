"""What you run beside the lecture: chat.py, label.py, report.py and coursework.py (python tools/NAME.py --help)."""
