"""The official `openai` Python client against a natter that asks for API keys:
no key and a wrong key get OpenAI's 401, a right key gets answers.
Usage: python3 keys.py BASE_URL KEY MODEL   (prints "openai keys: all checks passed")"""
import json
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI

base, key, model = sys.argv[1] + "/v1", sys.argv[2], sys.argv[3]
question = [{"role": "user", "content": "Say hello."}]

# The client will not go without a key, so the keyless call is plain HTTP.
try:
    urllib.request.urlopen(base + "/models")
    raise AssertionError("no key: the model list was served")
except urllib.error.HTTPError as e:
    assert e.code == 401, e
    body = json.load(e)["error"]
    assert body["code"] == "invalid_api_key" and "didn't provide an API key" in body["message"], body

for label, presented in (("wrong key", key + "-not"),):
    client = OpenAI(base_url=base, api_key=presented, max_retries=0)
    try:
        client.models.list()
        raise AssertionError(f"{label}: the model list was served")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
        assert e.body["code"] == "invalid_api_key", e.body
        assert e.body["type"] == "invalid_request_error", e.body
    try:
        client.chat.completions.create(model=model, messages=question, max_tokens=4)
        raise AssertionError(f"{label}: a chat was served")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e

client = OpenAI(base_url=base, api_key=key, max_retries=0)
assert model in [m.id for m in client.models.list()]
reply = client.chat.completions.create(model=model, messages=question, max_tokens=8, temperature=0)
assert reply.usage.completion_tokens >= 1, reply
stream = client.chat.completions.create(model=model, messages=question, max_tokens=8, stream=True)
assert any(c.choices and c.choices[0].delta.content for c in stream)
print("openai keys: all checks passed")
