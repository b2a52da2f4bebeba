"""The names of the figures a worker replica reports to Serve's autoscaler, shared by the replica
(``engine/hosting.py``) and the policies (``pdserve/autoscaling.py``). Torch-free, so the Serve
controller can import it."""

# Load: what the heartbeat reports too.
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"
RUNNING_SEQS = "running_seqs"  # running and waiting, less those waiting for a prefill worker's KV
KV_POOL_TOKENS = "kv_pool_tokens"  # the KV pool's size, in tokens
KV_WANTED_FRACTION = "kv_wanted_fraction"  # in use, and what its waiting sequences will take: over 1 if they don't fit

# Load the router holds back for the prefill pool (``router/prefill_queue.py``), reported by the Router deployment.
HELD_PREFILL_TOKENS = "held_prefill_tokens"

# Measured (``engine/throughput.py``): what the replica sustains while busy, what its requests look like.
PREFILL_TOKENS_PER_S = "prefill_tokens_per_s"
DECODE_TOKENS_PER_SEQ_S = "decode_tokens_per_seq_s"  # of one decoding sequence: 1 / TPOT
PROMPT_TOKENS_MEAN = "prompt_tokens_mean"
OUTPUT_TOKENS_MEAN = "output_tokens_mean"
