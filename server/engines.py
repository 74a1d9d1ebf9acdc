"""Which engine and scheduler serve: the transformers engine under our step loop, or vLLM under its own."""

from __future__ import annotations

from server.scheduler import Scheduler
from server.settings import Settings


def load_engine(s: Settings):
    if s.engine == "vllm":
        from decoding.vllm.engine import VLLMEngine

        return VLLMEngine(s.model, device=s.device, dtype=s.dtype, reward_path=s.reward_model, verifier_path=s.verifier,
                          verifier_files=verifier_files(s), tita_gate=s.tita_gate,
                          tita_candidates=s.tita_candidates, max_batch=s.max_batch, tensor_parallel_size=s.tensor_parallel_size,
                          gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len)
    from decoding.transformers_engine import TransformersEngine

    return TransformersEngine(s.model, device=s.device, dtype=s.dtype, reward_path=s.reward_model, verifier_path=s.verifier,
                              verifier_files=verifier_files(s), tita_gate=s.tita_gate, tita_candidates=s.tita_candidates)


def verifier_files(s: Settings) -> dict:
    return {"vocabulary": s.verifier_vocabulary, "calibration": s.verifier_calibration}


def make_scheduler(engine, s: Settings, **callbacks):
    """Our step loop over the transformers engine; vLLM batches by itself behind the same interface."""
    if engine.name == "vllm":
        from server.vllm_scheduler import EngineScheduler

        return EngineScheduler(engine, s.max_batch, s.max_queue, **callbacks)
    return Scheduler(engine, s.max_batch, s.max_queue, prefill_delay=s.prefill_delay, **callbacks)
