"""Shared fixtures: the embedded target engine, with and without its reward model and verifier, on the engine under test (VLM_STEER_TEST_ENGINE); the fast tier's slow list."""

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
        from decoding.vllm.engine import VLLMEngine

        e = VLLMEngine(MODELS_DIR / "vlm", max_batch=16, **paths)
        yield e
        e.close()
        return
    from decoding.transformers_engine import TransformersEngine

    yield TransformersEngine(MODELS_DIR / "vlm", **paths)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """Six held-out ShapeWorld scenes exported as a data set folder (the trainers' tests train on it)."""
    from server.cli import main

    root = tmp_path_factory.mktemp("shapes") / "data"
    main(["data", "shapeworld", "--split", "random", "--n", "6", "--seed", "4321", "--out", str(root)])
    return root


# The fast tier (`make test-unit`, under a minute) leaves out these files: the ones that train, soak, fuzz,
# start several servers or processes, or drive a browser. `make test` runs everything.
SLOW = {
    "server/test_soak.py", "server/test_families.py", "server/test_protocol.py", "server/test_engine_process.py",
    "server/test_lifecycle.py", "server/test_supervision.py", "bench/test_quality.py", "server/test_openapi_fuzz.py",
    "server/test_playground.py", "reward_models/test_train_reward.py", "deploy/test_manifests.py",
    "shapeworld/test_bench.py", "test_gpu_check.py", "docs/test_docs.py", "server/test_startup.py",
    "server/test_lmms_eval.py", "server/test_sampling_fields.py",
}


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if os.path.relpath(str(item.path), here) in SLOW:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast tier (make test-unit)")
