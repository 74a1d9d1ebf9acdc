"""Shared fixtures: the embedded target engine, with and without its reward model and verifier, on the engine under test (VLM_STEER_TEST_ENGINE)."""

import os

import pytest

from shapeworld.models import MODELS_DIR

# The engine behind the server tests: transformers (make test) or vllm (make test-vllm, vLLM's own virtualenv).
ENGINE = os.environ.get("VLM_STEER_TEST_ENGINE", "transformers")


@pytest.fixture(scope="session")
def engine():
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(MODELS_DIR / "vlm")


@pytest.fixture(scope="session")
def steering_engine():
    """The target with the embedded TITA reward model and calibrated FiSAO verifier, on ``ENGINE``."""
    paths = dict(reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")
    if ENGINE == "vllm":
        from decoding.vllm_engine import VLLMEngine

        e = VLLMEngine(MODELS_DIR / "vlm", max_batch=16, **paths)
        yield e
        e.close()
        return
    from decoding.transformers_engine import TransformersEngine

    yield TransformersEngine(MODELS_DIR / "vlm", **paths)
