"""Shared test set-up: offline, CPU, small."""

import os

# Tests must never reach the internet; a download attempted by mistake fails fast.
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + os.path.join(os.getcwd(), ".pytest_cache", "mlflow-unused.db"))
os.environ.setdefault("TQDM_DISABLE", "1")
