"""What a running server holds (settings, engine, scheduler, metrics, experiment, services, judge) and the
scheduler's callbacks into the metrics: one object, ``app.state.vlm``, that the routes read."""

from __future__ import annotations

from server.chat_run import OpenRuns
from server.experiments import Experiment
from server.metrics import Metrics
from server.profiles import ProfilesFile
from server.settings import Settings
from server.supervision import Heartbeat, engine_alive, engine_failure


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scheduler = None  # server.scheduler.Scheduler or one with its interface (engine process, vLLM)
        self.metrics = Metrics(settings.model_name)
        self.experiment = Experiment.load(settings.experiment) if settings.experiment else None
        self.profile_file = ProfilesFile.load(settings.profiles) if settings.profiles else None
        self.profiles = None  # server.profiles.Profiles: the model names that steer (once the engine is loaded)
        self.service = None  # server.chat_service.ChatService: bodies into engine rows
        self.chat = None  # server.serving_chat.ChatServing: the chat-completions handler
        self.judge = None  # reward_models.grounding.Judge: grounding blocks and mention metrics
        self.judging = None  # server.judging.BatchedJudge: its image scoring, batched across requests
        self.ready = False
        self.load_error: Exception | None = None  # why loading failed (server.app.load)
        self.draining = False
        self.heartbeat = Heartbeat(settings.engine_stall_timeout)  # the engine's progress: liveness (server.supervision)
        self.engine_failure: str | None = None  # how the engine died, once it has (the server then exits)
        self.runs = OpenRuns()  # requests being answered: a drain that reaches its deadline ends them

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining and self.engine_failure is None and engine_alive(self)

    def refusal(self) -> str:
        """Why new requests are refused (when not ``accepting``)."""
        if not self.ready:
            return "the server is loading"
        failure = engine_failure(self)
        if failure is not None:
            return f"the engine is down ({failure}); retry once the server has restarted"
        return "the server is shutting down"

    @property
    def methods(self) -> list[str]:
        return self.engine.available_methods if self.engine else []

    def on_step(self, sched) -> None:
        """After each engine step: batch gauges and steering seconds per method."""
        m = self.metrics
        m.running.labels(m.model).set(sched.num_running)
        m.waiting.labels(m.model).set(sched.num_waiting)
        for method, sec in sched.engine.pop_steering_seconds().items():
            m.steering_time.labels(m.model, method).observe(sec)
        for method, (asked, skipped) in sched.engine.pop_consultations().items():
            m.consultations.labels(m.model, method, "consulted").inc(asked)
            m.consultations.labels(m.model, method, "skipped").inc(skipped)

    def on_failure(self, e: Exception) -> None:
        """A row whose steering failed (``decoding.methods.SteeringFailed``)."""
        m = self.metrics
        m.steering_failures.labels(m.model, getattr(e, "method", "unknown")).inc()
