"""Where a run's MLflow store is, and whether it answers: without importing MLflow.

A run checks its store here before it builds data and model, so that a wrong or unreachable
tracking URI is one line within seconds, not MLflow's minutes of retries after the set-up.
MLflow itself (seconds of imports) is imported later, on the run's writer thread.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import sqlalchemy.engine

DEFAULT_URI = "sqlite:///results/mlflow.db"
PROBE_TIMEOUT_S = 5


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: the argument, else $MLFLOW_TRACKING_URI, else a SQLite file under results/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    db_path = sqlite_path(uri)
    if db_path is not None:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)  # SQLite cannot create the folder itself
        except OSError as err:
            raise type(err)(f"tracking store {uri}: cannot create its folder ({err})") from None
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:":
        raise ValueError(f"tracking uri {uri!r}: an MLflow SQLite store needs a file, e.g. sqlite:///results/mlflow.db")
    return Path(database)


def check(uri: str | None = None) -> str:
    """The resolved URI, once its store can be used: a SQLite file's folder exists, a server answers.

    Raises ConnectionError naming the URI when a server does not answer within PROBE_TIMEOUT_S.
    Any HTTP answer counts, an error status or a TLS complaint included: authentication and
    certificates are MLflow's business; only a store that is not there is refused here.
    """
    uri = resolve_uri(uri)
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
        return uri
    except urllib.error.HTTPError:
        return uri
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return uri
        reason = err.reason
    except OSError as err:  # accepted the connection, then never replied or reset it
        reason = err or "timed out"
    raise ConnectionError(f"tracking store {uri} does not answer ({reason}); start it, or set tracking.uri "
                          "or MLFLOW_TRACKING_URI to a store that runs")
