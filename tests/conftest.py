import pytest

from shapeworld.models import MODELS_DIR


@pytest.fixture(scope="session")
def engine():
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm")


@pytest.fixture(scope="session")
def steering_engine():
    """The target with the embedded TITA reward model and calibrated FiSAO verifier."""
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")
