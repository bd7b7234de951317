"""Shared test set-up: offline, CPU, small."""

import os

import pytest

from fedsq import data

# Progress bars are for people; keep test logs readable (tqdm reads TQDM_* variables).
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The digits dataset prepared once (read-only for the tests that share it)."""
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root)
    return root


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A fresh SQLite MLflow store per test module."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
