"""Decoding-time steering: the steering methods (pure batched functions over logits), the verifier they read, and the engines (transformers, vLLM) that run them."""
