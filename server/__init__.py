"""The loraplex server: `engine` (model, batching, LoRA) and `api` (gRPC fronts, metrics)."""
