"""The prefill role: run prompts with ``max_tokens=1`` and hold their KV for a decode worker to pull."""
