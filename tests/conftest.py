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


def pytest_collection_modifyitems(items):
    """The SLURM tests run last. They leave SLURM installed with its controller stopped, and from then on
    every Snakemake start waits about 9 s: the SLURM executor plugin runs `scontrol show config` when it
    is imported. Run before the workflow tests, they would add minutes to them."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is not None)
