"""Shared pytest setup: reference-model fixtures (see models/zoo.py)."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
if str(MODELS_DIR) not in sys.path:
    sys.path.insert(0, str(MODELS_DIR))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "realmodel: uses a real reference model (fetched and cached on first use)"
    )


def _model_path(fetch):
    """Run a zoo fetch; on failure fail under CI=true, else skip, with the reason."""
    try:
        return fetch()
    except RuntimeError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference model unavailable: {e}", pytrace=False)
        pytest.skip(f"reference model unavailable: {e}")


@pytest.fixture(scope="session")
def yolov8n_path():
    import zoo

    return _model_path(zoo.yolov8n)


@pytest.fixture(scope="session")
def ppocr_det_path():
    import zoo

    return _model_path(zoo.ppocr_det)


@pytest.fixture(scope="session")
def minilm_path():
    import zoo

    return _model_path(zoo.minilm)


@pytest.fixture(scope="session")
def digits_mlp_path():
    import zoo

    return _model_path(zoo.digits_mlp)
