"""The simulated engine: vLLM's scheduling and KV-cache semantics, step times from a hardware profile."""
