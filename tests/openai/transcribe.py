"""Drives natter's speech-to-text endpoints with the official `openai` Python
client: json, verbose_json, text, srt and vtt transcriptions, a translation, and
the error for a file that is not audio.
Usage: python3 transcribe.py BASE_URL VOICE_NOTE.ogg EXPECTED_TEXT"""
import re
import sys

import openai
from openai import OpenAI

base, voice, expected = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def words(text):
    return re.findall(r"[a-z']+", text.lower())


def close_enough(text):
    got, want = set(words(text)), words(expected)
    missing = [w for w in want if w not in got]
    assert len(missing) <= len(want) // 5, (missing, text)


with open(voice, "rb") as f:
    plain = client.audio.transcriptions.create(model="whisper-1", file=f)
close_enough(plain.text)

with open(voice, "rb") as f:
    verbose = client.audio.transcriptions.create(model="whisper-base", file=f, response_format="verbose_json")
assert verbose.language == "en", verbose.language
assert verbose.duration > 5, verbose.duration
starts = [s.start for s in verbose.segments]
assert len(starts) >= 2 and starts == sorted(starts), verbose.segments
assert " ".join(s.text.strip() for s in verbose.segments) == verbose.text, verbose

with open(voice, "rb") as f:
    text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text", language="en")
close_enough(text)

with open(voice, "rb") as f:
    srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt), srt

with open(voice, "rb") as f:
    vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
assert vtt.startswith("WEBVTT\n\n00:00:"), vtt

with open(voice, "rb") as f:
    translated = client.audio.translations.create(model="whisper-1", file=f)
close_enough(translated.text)

try:
    client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"just some text, no audio here" * 40))
    raise AssertionError("a text file was transcribed")
except openai.BadRequestError as e:
    assert "audio" in str(e).lower(), e

print("openai transcription client: all checks passed")
