"""The vllm engine's memory budget on a GPU: what the verifier holds in the engine's process comes off
vLLM's ``gpu_memory_utilization`` (no vLLM import: the arithmetic the engine logs at start-up)."""

import pytest

from decoding.vllm.engine import utilization_after

GIB = 2**30


def test_the_verifier_comes_off_vllms_share():
    # a CLIP-L/336 verifier in bfloat16 (0.43 B parameters, 0.80 GiB) on a 141 GiB H200 at vLLM's default 0.9
    assert utilization_after(0.9, int(0.80 * GIB), 141 * GIB) == pytest.approx(0.9 - 0.80 / 141)
    assert utilization_after(0.5, 0, 80 * GIB) == 0.5


def test_a_verifier_that_leaves_vllm_nothing_is_refused():
    with pytest.raises(ValueError, match="leaves vLLM nothing"):
        utilization_after(0.2, 16 * GIB, 80 * GIB)
