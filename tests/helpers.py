"""Small helpers the tests share."""

from __future__ import annotations

import asyncio
import time


def collect(engine, request):
    """Run one request to completion and return its deltas."""

    async def run():
        return [delta async for delta in engine.generate(request)]

    return asyncio.run(run())


def transformers_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def transformers_logprobs(model_dir, prompt_ids: list[int], output_ids: list[int]) -> list[list[float]]:
    """The log-probabilities transformers gives every vocabulary entry at each output position (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [logprobs[len(prompt_ids) - 1 + i].tolist() for i in range(len(output_ids))]


def wait_for(condition, timeout_s: float = 5.0, failure: str = "condition not met in time") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def whitespace_banned(model_dir) -> dict[int, float]:
    """A logit bias against every token that is only whitespace. Structured outputs let JSON hold any
    whitespace between its tokens (xgrammar's default), and a random model's likeliest token inside an
    object is often one: greedy, it would pad to max_tokens. A trained model does not; the tests steer."""
    from router.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer(model_dir)
    blank = [t for t in range(tokenizer.vocab_size) if not tokenizer.decode([t], skip_special_tokens=False).strip()]
    return {token: -100.0 for token in blank}
