"""A vLLM worker extension for tests (``engine_args={"worker_extension_cls": ...}``): reads what vLLM's
worker allocated, in plain types that cross the process boundary."""


class Probe:
    def kv_cache_layer_names(self) -> list[str]:
        """Every attention layer with a KV cache in the allocated KV-cache config, all groups."""
        config = self.model_runner.kv_cache_config
        return sorted(name for group in config.kv_cache_groups for name in group.layer_names)

    def fork_steps(self) -> int:
        """Forward passes of this worker's model that ran the reward model's layers (fork or separate)."""
        from decoding.vllm.fork_spec import live_model

        return live_model().fork_steps

    def reward_shares_tower(self) -> bool:
        """Whether the separate reward model inside vLLM's model reuses the target's vision tower."""
        from decoding.vllm.fork_spec import live_model

        return bool(live_model().rm_shares_tower)

    def rm_image_calls(self) -> int:
        """Image encodings that ran a separate reward model's tower or projector inside vLLM's model."""
        from decoding.vllm.fork_spec import live_model

        return live_model().rm_image_calls
