"""A checkpoint's sampling defaults, read as vLLM's ``--generation-config`` reads them.

vLLM's OpenAI server (``ModelConfig.get_diff_sampling_param``) takes the sampling fields of the model
folder's ``generation_config.json`` that differ from transformers' ``GenerationConfig`` defaults and uses
them for every request field left unset (null or absent): request first, then the checkpoint, then
OpenAI's neutral defaults. The same fields are read here, for both engines: ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` and
``max_new_tokens`` (the default ``max_tokens``, kept within ``--max-tokens-limit``). Qwen2.5-VL, for one,
ships ``repetition_penalty`` 1.05, ``top_k`` 1 and ``top_p`` 0.001.

The setting ``generation_config`` takes vLLM's values: ``auto`` (the model folder's file), ``vllm`` (none:
OpenAI's neutral defaults), or a folder that holds a ``generation_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

# vLLM's ``available_params`` (vllm/config/model.py), in its order
FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p", "min_p",
          "max_new_tokens")


@dataclass(frozen=True)
class GenerationDefaults:
    values: dict = field(default_factory=dict)  # request field -> its default (max_new_tokens as max_tokens)
    source: str = "vllm"  # "vllm" (none read) or the folder read

    def describe(self) -> str:
        """One line for the start-up log: which defaults apply, and from where."""
        if self.source == "vllm":
            return "sampling defaults: none from the checkpoint (--generation-config vllm)"
        if not self.values:
            return f"sampling defaults: none in {self.source}'s generation config"
        shown = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return (f"sampling defaults from {self.source}'s generation config, for the fields a request leaves unset: "
                f"{shown} (--generation-config vllm to ignore them)")


def read_generation_config(folder: str | Path) -> dict:
    """The non-default fields of a folder's generation config (``GenerationConfig.to_diff_dict``); without a
    ``generation_config.json``, those of its model config, as vLLM's ``try_get_generation_config`` falls back;
    {} when the folder has neither."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
        except (OSError, ValueError):
            return {}
    return config.to_diff_dict()


def load_generation_defaults(setting: str, model: str | Path, max_tokens_limit: int) -> GenerationDefaults:
    """The defaults ``setting`` (``auto``, ``vllm`` or a folder) gives. A value the request schema would
    refuse (a temperature of 3, a float top_k) is a ValueError naming the file and the field: the server
    does not start with defaults every request would inherit as an error."""
    if setting == "vllm":
        return GenerationDefaults()
    folder = Path(model) if setting == "auto" else Path(setting)
    diff = read_generation_config(folder)
    values = {k: diff[k] for k in FIELDS if diff.get(k) is not None}
    if "max_new_tokens" in values:
        values["max_tokens"] = min(values.pop("max_new_tokens"), max_tokens_limit)
    from server.protocol import ChatCompletionRequest

    try:
        ChatCompletionRequest.model_validate({"model": "-", "messages": [{"role": "user", "content": "-"}], **values})
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{folder}'s generation config: {name}={values.get(name)!r}: {err['msg']} (serve with "
                         "--generation-config vllm to ignore the checkpoint's sampling defaults)") from None
    return GenerationDefaults(values, str(folder))
