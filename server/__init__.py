"""The OpenAI-compatible HTTP server: routes, chat serving, schemas, streaming, A/B arms, metrics, settings and the `vlm-steer` CLI."""
