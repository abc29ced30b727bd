"""Drives natter with the official `openai` Python client: model list, a streamed
chat, a non-streamed one, and the error for an unknown model.
Usage: python3 client.py BASE_URL   (prints "openai client: all checks passed")"""
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert "smollm2-135m-instruct" in models, models

question = [{"role": "user", "content": "What is the capital of France?"}]
stream = client.chat.completions.create(
    model="smollm2-135m-instruct", messages=question, stream=True, temperature=0, max_tokens=48)
text, last = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text.append(chunk.choices[0].delta.content)
    last = chunk
streamed = "".join(text)
assert "Paris" in streamed, streamed
assert last.choices[0].finish_reason in ("stop", "length"), last
assert last.usage.completion_tokens > 1 and last.usage.prompt_tokens > 5, last.usage

reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, temperature=0, max_tokens=48)
assert reply.choices[0].message.content == streamed, (reply.choices[0].message.content, streamed)
assert reply.usage.total_tokens == last.usage.total_tokens

try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e

print("openai client: all checks passed")
