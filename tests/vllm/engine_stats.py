"""What a test reads from a live vLLM engine's own stat logger (in the API process)."""


def preempted_requests(engine) -> int:
    """Requests vLLM preempted so far (its Prometheus logger's ``num_preempted_reqs`` counter)."""
    prom = [s for s in engine.llm.logger_manager.stat_loggers if hasattr(s, "counter_num_preempted_reqs")]
    return sum(c._value.get() for c in prom[0].counter_num_preempted_reqs.values())
