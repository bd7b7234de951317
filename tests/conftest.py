"""Shared test set-up: offline, CPU, small."""

import os

# Progress bars are for people; keep test logs readable (tqdm reads TQDM_* variables).
os.environ.setdefault("TQDM_DISABLE", "1")
