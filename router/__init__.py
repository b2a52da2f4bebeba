"""The ingress: request validation, tokenization, block hashing, the prefix index and placement.

Never imports torch or vLLM (a test checks it in a fresh interpreter).
"""
