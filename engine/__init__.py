"""One worker's model runtime: vLLM's engine run in-process, configured from pdserve's config.

Kept light on purpose: importing ``engine`` (or ``engine.block_hash``) loads
neither torch nor vLLM, so the router may use the block-hash scheme.
"""
