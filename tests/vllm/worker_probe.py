"""A vLLM worker extension for tests (``engine_args={"worker_extension_cls": ...}``): reads what vLLM's
worker allocated, in plain types that cross the process boundary."""


class Probe:
    def kv_cache_layer_names(self) -> list[str]:
        """Every attention layer with a KV cache in the allocated KV-cache config, all groups."""
        config = self.model_runner.kv_cache_config
        return sorted(name for group in config.kv_cache_groups for name in group.layer_names)

    def fork_steps(self) -> int:
        """Forward passes of this worker's model that ran the forked reward model's layers."""
        from decoding.vllm.fork_spec import live_model

        return live_model().fork_steps
