"""Steering inside vLLM: one V1 logits processor, registered at engine start, active per request.

A thin adapter: vLLM's batch updates and logits go to ``decoding.vllm.adapter.PerRequestSteering``,
which runs the same steering method objects as the transformers engine. The processor lives in vLLM's
worker process, so it loads what the methods need there: the reward model (``REWARD_ENV``; nothing when it
is part of vLLM's model) and the verifier's vocabulary and calibration (``VERIFIER_ENV``; its weights stay
in the engine's process, which scores each image at admission), and reads the target's processor and
config (not its weights). What the
server needs back (steered tokens, failures, steering time, engine steps) goes through a small shared
counter file (``COUNTERS_ENV``), and per-token explanations through a ring file (``EXPLAIN_ENV``).
"""

from __future__ import annotations

import json
import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from decoding.methods import Resources
from decoding.vllm.adapter import PerRequestSteering, WorkerTarget
from decoding.vllm.fork_spec import ARCHES, InModelFork
from decoding.vllm.protocol import (ARG, COUNTERS_ENV, EXPLAIN_ENV, REWARD_ENV, TITA_ENV, VERIFIER_ENV, Counters, ExplainRing,
                                    validate)


def _rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # not initialised (a single process)
        return 0


class SteeringLogitsProcessor(LogitsProcessor):
    """TITA and FiSAO for the rows whose ``extra_args`` ask for them; other rows are untouched."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if ARG in extra:
            validate(extra[ARG])

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # with tensor parallelism every rank runs this processor alike; one of them reports
        counters = Counters(os.environ[COUNTERS_ENV]) if os.environ.get(COUNTERS_ENV) and _rank() == 0 else None
        explain = ExplainRing(os.environ[EXPLAIN_ENV]) if os.environ.get(EXPLAIN_ENV) and _rank() == 0 else None
        dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        reward = verifier = None
        hf = vllm_config.model_config.hf_config
        if os.environ.get(REWARD_ENV) and set(ARCHES) & set(getattr(hf, "architectures", None) or []):
            reward = InModelFork(os.environ[REWARD_ENV], hf.get_text_config().vocab_size)  # inside vLLM's model
        elif os.environ.get(REWARD_ENV):
            from decoding.transformers_engine import TransformersEngine

            # a forked reward model runs here as a whole model: the target (vLLM's, loaded again) with the
            # fork's layers in place; inside vLLM's own model in the next step of the design (docs/architecture.md)
            reward = TransformersEngine(os.environ[REWARD_ENV], device=str(device), dtype=dtype,
                                        fork_target=vllm_config.model_config.model)
        if os.environ.get(VERIFIER_ENV):
            from decoding.verifier import Verifier

            spec = json.loads(os.environ[VERIFIER_ENV])
            # its vocabulary and calibration: the engine's process scored each request's image at admission
            verifier = Verifier(spec["path"], weights=False, vocabulary=spec.get("vocabulary"),
                                calibration=spec.get("calibration"))
        tita = json.loads(os.environ.get(TITA_ENV) or "{}")
        target = WorkerTarget(vllm_config.model_config.model, tita.get("gate", 1.0), tita.get("candidates", 0))
        self.steering = PerRequestSteering(Resources(target, reward, verifier), counters, explain)
        self.in_model = reward if isinstance(reward, InModelFork) else None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.steering.update(batch_update.removed, batch_update.added, batch_update.moved,
                                 lambda d: d == MoveDirectionality.SWAP)
            if self.in_model is not None:  # the fork's layers run only in steps that hold a TITA row
                self.in_model.run_layers(self.steering.uses("tita"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.steering.apply(logits)
