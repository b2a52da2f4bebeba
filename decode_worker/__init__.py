"""The decode role: pull a prompt's KV (or prefill it locally), join the running batch, stream tokens."""
