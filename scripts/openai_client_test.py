#!/usr/bin/env python3
"""Checks a running `gptoss serve` with the official `openai` Python client.

Usage (CI):
    python3 -m venv .venv-client && .venv-client/bin/pip install -r scripts/requirements-client.txt
    gptoss serve --port 8000 &            # the demo model is fine: only the API is checked
    .venv-client/bin/python scripts/openai_client_test.py --base-url http://127.0.0.1:8000/v1

Every check runs even if an earlier one failed; the script prints one line per check, then
"N passed, N failed", and exits non-zero if anything failed. The outputs of a random demo model
are nonsense, so the checks are about the API's shape and mechanics (types, streaming, usage,
finish reasons, errors), not about the text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import openai

FINISH = {"stop", "length", "tool_calls"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


class Suite:
    def __init__(self, client: openai.OpenAI, model: str | None, api_key: str | None, base_url: str):
        self.client = client
        self.model = model
        self.api_key = api_key
        self.base_url = base_url
        self.passed = 0
        self.failed = 0

    def run(self, name: str, fn) -> None:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            self.failed += 1
            print(f"FAIL {name} ({time.monotonic() - t0:.2f}s): {type(e).__name__}: {e}")
            traceback.print_exc(limit=3, file=sys.stdout)
        else:
            self.passed += 1
            print(f"PASS {name} ({time.monotonic() - t0:.2f}s)")

    # ---- checks -------------------------------------------------------------------------------

    def models(self) -> None:
        models = self.client.models.list()
        ids = [m.id for m in models.data]
        check(len(ids) >= 1, f"no models: {ids}")
        if self.model is None:
            self.model = ids[0]
        check(self.model in ids, f"{self.model} not in {ids}")

    def chat(self) -> None:
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2+2?"},
            ],
            max_tokens=16,
            temperature=0,
        )
        check(r.object == "chat.completion", r.object)
        check(len(r.choices) == 1, "one choice")
        c = r.choices[0]
        check(c.message.role == "assistant", c.message.role)
        check(c.finish_reason in FINISH, str(c.finish_reason))
        u = r.usage
        check(u is not None and 1 <= u.completion_tokens <= 16, f"usage {u}")
        check(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage {u}")

    def chat_deterministic(self) -> None:
        def once() -> str:
            r = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Tell me a story."}],
                max_tokens=12,
                temperature=0,
            )
            m = r.choices[0].message
            return f"{m.content}|{getattr(m, 'reasoning_content', None)}"

        a, b = once(), once()
        check(a == b, f"greedy outputs differ: {a!r} vs {b!r}")

    def chat_stream(self) -> None:
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        check(len(chunks) >= 2, f"{len(chunks)} chunks")
        check(all(ch.object == "chat.completion.chunk" for ch in chunks), "chunk objects")
        check(chunks[0].choices[0].delta.role == "assistant", "first delta has the role")
        finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
        check(len(finishes) == 1 and finishes[0] in FINISH, f"finish reasons {finishes}")
        last = chunks[-1]
        check(last.choices == [] and last.usage is not None, "last chunk carries the usage")
        check(1 <= last.usage.completion_tokens <= 12, f"usage {last.usage}")

    def chat_n_and_logprobs(self) -> None:
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            n=2,
            seed=3,
            logprobs=True,
            top_logprobs=2,
        )
        check(len(r.choices) == 2, f"{len(r.choices)} choices")
        check(sorted(c.index for c in r.choices) == [0, 1], "indices")
        for c in r.choices:
            check(c.logprobs is not None, "logprobs requested")
            for t in c.logprobs.content or []:
                check(isinstance(t.token, str) and t.logprob <= 0.0, f"bad logprob {t}")
                check(len(t.top_logprobs) <= 2, "top_logprobs")
        check(r.usage.completion_tokens <= 12, f"usage {r.usage}")

    def chat_tools(self) -> None:
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            reasoning_effort="low",
            max_tokens=24,
        )
        c = r.choices[0]
        check(c.finish_reason in FINISH, str(c.finish_reason))
        for call in c.message.tool_calls or []:
            check(call.type == "function" and isinstance(call.function.name, str), f"call {call}")
            check(isinstance(call.function.arguments, str), "arguments are a string")
        # A full round trip in the history is accepted.
        r2 = self.client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
            ],
            tools=[WEATHER_TOOL],
            max_tokens=8,
        )
        check(r2.choices[0].finish_reason in FINISH, str(r2.choices[0].finish_reason))

    def chat_forced_tool(self) -> None:
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Weather in Rome?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=8,
        )
        calls = r.choices[0].message.tool_calls or []
        check(len(calls) >= 1 and calls[0].function.name == "get_weather", f"calls {calls}")

    def completions(self) -> None:
        r = self.client.completions.create(
            model=self.model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=1
        )
        check(r.object == "text_completion", r.object)
        c = r.choices[0]
        check(isinstance(c.text, str) and c.finish_reason in FINISH, f"{c}")
        check(len(c.logprobs.tokens) == r.usage.completion_tokens, "one logprob per token")
        s = self.client.completions.create(
            model=self.model,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        text = "".join(ch.choices[0].text for ch in s if ch.choices)
        check(text == c.text, f"streamed {text!r} != {c.text!r}")

    def responses(self) -> None:
        r = self.client.responses.create(
            model=self.model, input="Say hello.", instructions="Be brief.", max_output_tokens=12
        )
        check(r.object == "response", r.object)
        check(r.status in ("completed", "incomplete"), r.status)
        check(isinstance(r.output_text, str), "output_text")
        check(r.usage is not None and r.usage.output_tokens >= 1, f"usage {r.usage}")
        events = list(
            self.client.responses.create(model=self.model, input="Say hello.", max_output_tokens=8, stream=True)
        )
        kinds = [e.type for e in events]
        check(kinds[0] == "response.created", f"first event {kinds[:1]}")
        check(kinds[-1] in ("response.completed", "response.incomplete"), f"last event {kinds[-1:]}")

    def errors(self) -> None:
        try:
            self.client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
            raise AssertionError("unknown model accepted")
        except openai.NotFoundError as e:
            check(e.status_code == 404, str(e.status_code))
        try:
            self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "x"}], temperature=5
            )
            raise AssertionError("temperature 5 accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400, str(e.status_code))
            check("temperature" in str(e), str(e))
        try:
            self.client.chat.completions.create(model=self.model, messages=[], max_tokens=2)
            raise AssertionError("empty messages accepted")
        except openai.BadRequestError:
            pass

    def auth(self) -> None:
        bad = openai.OpenAI(api_key="definitely-wrong-key", base_url=self.base_url, max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("wrong API key accepted")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, str(e.status_code))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="if the server requires one")
    p.add_argument("--model", default=None, help="default: the first served model")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server to come up")
    a = p.parse_args()

    client = openai.OpenAI(api_key=a.api_key or "EMPTY", base_url=a.base_url, max_retries=0, timeout=120)
    deadline = time.monotonic() + a.wait
    while True:
        try:
            client.models.list()
            break
        except openai.AuthenticationError:
            break
        except Exception as e:  # noqa: BLE001
            if time.monotonic() > deadline:
                print(f"server at {a.base_url} not reachable: {e}")
                print("0 passed, 1 failed")
                return 1
            time.sleep(0.5)

    s = Suite(client, a.model, a.api_key, a.base_url)
    s.run("models.list", s.models)
    s.run("chat.completions", s.chat)
    s.run("chat.completions greedy is deterministic", s.chat_deterministic)
    s.run("chat.completions stream + include_usage", s.chat_stream)
    s.run("chat.completions n=2 + logprobs", s.chat_n_and_logprobs)
    s.run("chat.completions tools + round trip", s.chat_tools)
    s.run("chat.completions named tool_choice", s.chat_forced_tool)
    s.run("completions (plain and stream)", s.completions)
    s.run("responses (plain and stream)", s.responses)
    s.run("errors (404, 400)", s.errors)
    if a.api_key:
        s.run("wrong API key is 401", s.auth)
    print(f"{s.passed} passed, {s.failed} failed")
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
