"""The vllm engine, in its own room: the API process's side (``engine``: requests to vLLM inputs, its
outputs to our events; ``fork_spec``: which reward model goes inside vLLM's model), the protocol both
sides share (``protocol``: request arguments, the counters and explanation files), and the worker's side
(``steering``: the logits processor vLLM loads, a thin shell over ``adapter``, which drives the methods from
vLLM's batch updates and imports nothing of vLLM; ``fork_model``, ``paired_model``, ``in_model``: models that
hold TITA's reward model inside vLLM's own, imported only in vLLM's processes)."""
