"""Prometheus metrics: vLLM's request families and buckets under our prefix, labelled by model,
method and arm, plus steering's own (steered tokens, per-step steering time, aborts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "vlm_steer_"
# vLLM v1/metrics buckets
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
PHASE = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
STEP = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]

REQ = ["model", "method", "arm"]


class Metrics:
    def __init__(self, model: str):
        self.model = model
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", REQ, buckets=TTFT, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between tokens", REQ, buckets=ITL, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token", REQ, buckets=PHASE, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting for a batch row", REQ, buckets=PHASE, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens", REQ, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", REQ, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished requests", REQ + ["finished_reason"], registry=r)
        self.errors = Counter(PREFIX + "request_errors", "Requests answered with an error", ["model", "code"], registry=r)
        self.aborted = Counter(PREFIX + "requests_aborted", "Requests aborted (client gone or deadline)", REQ + ["reason"], registry=r)
        self.steered = Counter(PREFIX + "steered_tokens", "Steps at which steering changed the chosen token", REQ, registry=r)
        self.steering_time = Histogram(PREFIX + "steering_step_seconds", "Steering time per engine step (reward model, verifier, contrast)",
                                       ["model", "method"], buckets=STEP, registry=r)
        self.consultations = Counter(PREFIX + "reward_consultations", "Row-steps at which a steering method consulted "
                                     "its reward model (outcome consulted) or left the target's scores alone (skipped: "
                                     "the target was confident, --tita-gate)", ["model", "method", "outcome"], registry=r)
        self.steering_failures = Counter(PREFIX + "steering_failures", "Requests failed because their steering method raised",
                                         ["model", "method"], registry=r)
        self.mentions = Counter(PREFIX + "object_mentions", "Distinct objects mentioned per response, judged by the grounding "
                                "verifier (CHAIR_i's denominator; a response judged by sampling weighs 1/--grounding-sample)", REQ, registry=r)
        self.suspect = Counter(PREFIX + "suspect_mentions", "Mentioned objects the grounding verifier judges absent "
                               "((suspect + unsure / 2) / object_mentions: an estimated CHAIR_i)", REQ, registry=r)
        self.unsure = Counter(PREFIX + "unsure_mentions", "Mentioned objects the grounding verifier cannot decide on "
                              "(counted as half a hallucination in the estimate)", REQ, registry=r)
        self.control_arm = Gauge(PREFIX + "control_arm", "1 for the experiment's control arm (alerts compare the others "
                                 "with it)", ["model", "arm"], registry=r)
        self.alert_margin = Gauge(PREFIX + "grounding_alert_margin", "How far an arm's estimated CHAIR_i may exceed "
                                  "the control arm's before VlmSteerArmHallucinatesMore fires", ["model"], registry=r)
        self.queue_capacity = Gauge(PREFIX + "queue_capacity", "Requests that may wait for a row (beyond: 429)", ["model"], registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch", ["model"], registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a row", ["model"], registry=r)
        self.running.labels(model).set(0)
        self.waiting.labels(model).set(0)

    def labels(self, method: str, arm: str) -> dict:
        return {"model": self.model, "method": method, "arm": arm}
