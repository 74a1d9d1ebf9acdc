import pytest

from shapeworld.models import MODELS_DIR


@pytest.fixture(scope="session")
def engine():
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm")
