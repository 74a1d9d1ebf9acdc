"""vLLM's side of the vllm engine: models that hold the reward model inside vLLM (``fork_model``, imported
only in vLLM's processes) and what the API process needs to select them (``fork_spec``, no vllm import)."""
