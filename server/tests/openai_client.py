#!/usr/bin/env python3
"""`purehw serve` from the outside: the official `openai` SDK (and raw HTTP for errors).

    python3 server/tests/openai_client.py --base-url http://127.0.0.1:8006/v1 --model smollm2-135m CASE...

Cases (run in the order given): see CASES at the bottom, or --help. Exits 0 when every case
passed, 1 with a `FAIL case: why` line (and the request/response involved) otherwise.
server/tests/serve.rs starts the server and runs these; PUREHW_ASSERT_SPEEDUP=1 makes the
`concurrency` case also require an aggregate speed-up of at least 3x.
"""

import argparse
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

try:
    import openai
    from openai import OpenAI
except ImportError:  # pragma: no cover
    print("FAIL setup: the `openai` package is not installed (python3 -m pip install 'openai==1.*')")
    sys.exit(2)


class Failure(Exception):
    pass


def check(cond, msg, *details):
    if not cond:
        extra = "".join(f"\n    {d}" for d in details)
        raise Failure(f"{msg}{extra}")


def short(x, n=600):
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


class Ctx:
    def __init__(self, args):
        self.base = args.base_url.rstrip("/")  # .../v1
        self.root = re.sub(r"/v1$", "", self.base)  # for /health, /metrics, /tokenize
        self.model = args.model
        self.api_key = args.api_key
        self.max_body = args.max_body
        self.ctx_size = args.ctx_size
        self.max_tokens_cap = args.max_tokens
        # Any key works unless the server has --api-key.
        self.client = OpenAI(base_url=self.base, api_key=self.api_key or "sk-anything", max_retries=0, timeout=args.timeout)
        self.timeout = args.timeout

    # --- raw HTTP ------------------------------------------------------------------------
    def http(self, method, path, body=None, headers=None, raw=None, timeout=None):
        """(status, headers, parsed JSON or text). `path` is relative to the server root."""
        url = self.root + path
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v is not None}
        req = urllib.request.Request(url, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                status, hdrs, text = r.status, dict(r.headers), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, hdrs, text = e.code, dict(e.headers), e.read().decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return status, hdrs, parsed

    def mt(self, n):
        """`n` tokens, or fewer under --max-tokens (slow backends)."""
        return min(n, self.max_tokens_cap) if self.max_tokens_cap else n

    def chat(self, content, **kw):
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], **kw
        )

    def stream_chat(self, content, **kw):
        """(text, finish_reason, usage or None, chunks)."""
        kw.setdefault("temperature", 0)
        s = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], stream=True, **kw
        )
        text, finish, usage, chunks = "", None, None, []
        for c in s:
            chunks.append(c)
            if c.usage is not None:
                usage = c.usage
            for ch in c.choices:
                if ch.delta and ch.delta.content:
                    text += ch.delta.content
                if ch.finish_reason:
                    finish = ch.finish_reason
        return text, finish, usage, chunks


def check_usage(u, max_tokens=None, where=""):
    check(u is not None, f"{where}: no usage")
    check(u.prompt_tokens > 0, f"{where}: prompt_tokens = {u.prompt_tokens}")
    check(
        u.total_tokens == u.prompt_tokens + u.completion_tokens,
        f"{where}: total_tokens {u.total_tokens} != prompt {u.prompt_tokens} + completion {u.completion_tokens}",
    )
    if max_tokens is not None:
        check(u.completion_tokens <= max_tokens, f"{where}: completion_tokens {u.completion_tokens} > max_tokens {max_tokens}")


def check_error_shape(status, body, where):
    check(status != 500, f"{where}: got a 500", short(body))
    check(isinstance(body, dict) and isinstance(body.get("error"), dict), f"{where}: not an OpenAI error object", short(body))
    e = body["error"]
    for k in ("message", "type", "param", "code"):
        check(k in e, f"{where}: error has no {k!r}", short(body))
    check(isinstance(e["message"], str) and e["message"], f"{where}: empty error message", short(body))


def expect_400(c, name, body, param):
    """POST `body` to /v1/chat/completions: a 400 in OpenAI's error shape naming `param`."""
    st, _, b = c.http("POST", "/v1/chat/completions", body)
    check_error_shape(st, b, name)
    check(st == 400 and b["error"]["param"] == param, f"{name}: {st} {short(b)}, want 400 naming {param}")
    print(f"  {name}: 400 {short(b['error']['message'], 120)!r}")


# ----------------------------------------------------------------------------------------------
# Cases

PROMPT = "Write three sentences about the sea."


def case_models(c):
    ids = [m.id for m in c.client.models.list().data]
    check(c.model in ids, f"models.list() does not contain {c.model!r}", ids)
    m = c.client.models.retrieve(c.model)
    check(m.id == c.model, f"models.retrieve({c.model!r}).id = {m.id!r}")
    check(m.object == "model", f"object = {m.object!r}")
    try:
        c.client.models.retrieve("no-such-model")
        raise Failure("models.retrieve('no-such-model') did not fail")
    except openai.NotFoundError:
        pass


def case_default_models(c):
    # `purehw serve` without -m: the instruction-tuned model first, the pretrained Gemma beside it.
    ids = [m.id for m in c.client.models.list().data]
    check(ids == ["smollm2-135m", "gemma3-270m"], "models.list() of a plain `purehw serve`", ids)
    r = c.client.chat.completions.create(
        model=ids[0], temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    text = r.choices[0].message.content
    print(f"  {ids[0]}: {text!r}")
    check("Paris" in text, "the default chat model does not answer", text)


def case_health(c):
    st, _, body = c.http("GET", "/health")
    check(st == 200, f"/health: {st}", short(body))
    check(isinstance(body, dict) and body.get("status") == "ok", "/health status is not ok", short(body))


def case_chat(c):
    r = c.chat(PROMPT, max_tokens=c.mt(32))
    ch = r.choices[0]
    print(f"  chat: {ch.message.content!r} ({ch.finish_reason}, {r.usage})")
    check(ch.message.role == "assistant", f"role = {ch.message.role!r}")
    check(ch.message.content and ch.message.content.strip(), "empty reply", r)
    check(ch.finish_reason in ("stop", "length"), f"finish_reason = {ch.finish_reason!r}")
    check_usage(r.usage, c.mt(32), "chat")
    check(r.model == c.model, f"model = {r.model!r}")
    check(r.object == "chat.completion", f"object = {r.object!r}")
    # A system message and a multi-turn conversation work too.
    r2 = c.client.chat.completions.create(
        model=c.model,
        temperature=0,
        max_tokens=c.mt(16),
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
    )
    check(r2.choices[0].message.content, "multi-turn: empty reply", r2)
    check_usage(r2.usage, c.mt(16), "multi-turn")


def case_stream(c):
    kw = dict(max_tokens=c.mt(32), seed=7)
    r = c.chat(PROMPT, **kw)
    want = r.choices[0].message.content
    text, finish, usage, chunks = c.stream_chat(PROMPT, stream_options={"include_usage": True}, **kw)
    print(f"  streamed {len(chunks)} chunks: {text!r} ({finish})")
    check(text == want, "streamed text != non-streamed text (greedy)", f"streamed: {text!r}", f"non-streamed: {want!r}")
    check(finish == r.choices[0].finish_reason, f"streamed finish {finish!r} != {r.choices[0].finish_reason!r}")
    check(chunks and chunks[0].choices and chunks[0].choices[0].delta.role == "assistant", "first chunk has no role", chunks[:1])
    last = chunks[-1]
    check(last.usage is not None and last.choices == [], "include_usage: the last chunk is not a usage-only chunk", last)
    check_usage(usage, c.mt(32), "stream usage")
    check(
        (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens),
        f"stream usage {usage} != non-streamed usage {r.usage}",
    )
    check(all(ch.object == "chat.completion.chunk" for ch in chunks), "a chunk's object is not chat.completion.chunk")
    check(len({ch.id for ch in chunks}) == 1, "chunks have different ids")
    # Without include_usage, no chunk carries usage.
    _, _, usage2, _ = c.stream_chat(PROMPT, **kw)
    check(usage2 is None, "usage sent without stream_options.include_usage", usage2)


def case_completions(c):
    prompt = "The capital of France is"
    n = c.mt(12)
    r = c.client.completions.create(model=c.model, prompt=prompt, max_tokens=n, temperature=0)
    ch = r.choices[0]
    print(f"  completion: {ch.text!r} ({ch.finish_reason}, {r.usage})")
    check(ch.text, "empty completion", r)
    check(ch.finish_reason in ("stop", "length"), f"finish_reason = {ch.finish_reason!r}")
    check_usage(r.usage, n, "completions")
    check(r.object == "text_completion", f"object = {r.object!r}")
    # The same prompt as token ids (what the server itself would encode).
    st, _, tk = c.http("POST", "/tokenize", {"model": c.model, "content": prompt, "add_special": True})
    check(st == 200, f"/tokenize: {st}", short(tk))
    ids = tk["tokens"]
    r2 = c.client.completions.create(model=c.model, prompt=ids, max_tokens=n, temperature=0)
    print(f"  completion from {len(ids)} ids: {r2.choices[0].text!r}")
    check(r2.usage.prompt_tokens == len(ids), f"prompt_tokens {r2.usage.prompt_tokens} != {len(ids)} ids")
    check(r2.choices[0].text == ch.text, "ids prompt gives other text than the string prompt",
          f"ids: {r2.choices[0].text!r}", f"text: {ch.text!r}")
    # Streamed completions.
    s = c.client.completions.create(model=c.model, prompt=prompt, max_tokens=n, temperature=0, stream=True)
    text = "".join(x.choices[0].text for x in s if x.choices)
    check(text == ch.text, "streamed completion != non-streamed", f"{text!r} vs {ch.text!r}")
    # echo: the prompt, then the same completion.
    r3 = c.client.completions.create(model=c.model, prompt=prompt, max_tokens=n, temperature=0, echo=True)
    check(r3.choices[0].text == prompt + ch.text, "echo: text is not prompt + completion", repr(r3.choices[0].text))
    s = c.client.completions.create(model=c.model, prompt=prompt, max_tokens=n, temperature=0, echo=True, stream=True)
    text = "".join(x.choices[0].text for x in s if x.choices)
    check(text == prompt + ch.text, "streamed echo is not prompt + completion", repr(text))


def case_logprobs(c):
    r = c.chat(PROMPT, max_tokens=12, logprobs=True, top_logprobs=3)
    ch = r.choices[0]
    check(ch.logprobs is not None and ch.logprobs.content is not None, "no logprobs.content", r)
    lps = ch.logprobs.content
    n = r.usage.completion_tokens
    print(f"  {len(lps)} logprob entries for {n} completion tokens ({ch.finish_reason}): "
          + ", ".join(f"{e.token!r}:{e.logprob:.3f}" for e in lps[:6]))
    # One entry per generated token (an end-of-turn token that ends the reply is not text).
    ok = len(lps) == n or (ch.finish_reason == "stop" and len(lps) == n - 1)
    check(ok, f"{len(lps)} logprob entries for {n} completion tokens (finish {ch.finish_reason})")
    for i, e in enumerate(lps):
        check(e.logprob <= 1e-6, f"entry {i}: logprob {e.logprob} > 0")
        check(len(e.top_logprobs) == 3, f"entry {i}: {len(e.top_logprobs)} top_logprobs, want 3", e)
        for t in e.top_logprobs:
            check(t.logprob <= 1e-6, f"entry {i}: top logprob {t.logprob} > 0", e)
        best = max(t.logprob for t in e.top_logprobs)
        check(e.logprob >= best - 1e-4, f"entry {i}: greedy token {e.token!r} ({e.logprob}) below a top entry ({best})", e)
        tops = [t.logprob for t in e.top_logprobs]
        check(tops == sorted(tops, reverse=True), f"entry {i}: top_logprobs not sorted", tops)
    joined = "".join(e.token for e in lps)
    if ch.message.content.isascii():
        check(joined == ch.message.content, "the logprob tokens do not spell the content",
              f"tokens: {joined!r}", f"content: {ch.message.content!r}")
    # `bytes` are the tokens' real bytes, also for tokens that hold part of a character, so they
    # spell the content exactly.
    r4 = c.chat("Translate to Japanese: I love cherry blossoms.", max_tokens=16, logprobs=True, top_logprobs=1)
    c4 = r4.choices[0]
    spelled = b"".join(bytes(e.bytes) for e in c4.logprobs.content)
    print(f"  non-ASCII: {c4.message.content!r} from {len(c4.logprobs.content)} tokens' bytes")
    check(spelled == c4.message.content.encode(), "logprob bytes do not spell the content",
          repr(spelled), repr(c4.message.content))
    # Streamed: one logprob per content chunk, same tokens.
    s = c.client.chat.completions.create(model=c.model, messages=[{"role": "user", "content": PROMPT}],
                                         temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
    stoks = [e.token for x in s for ch2 in x.choices if ch2.logprobs and ch2.logprobs.content for e in ch2.logprobs.content]
    check(stoks == [e.token for e in lps], "streamed logprob tokens differ", stoks, [e.token for e in lps])
    # Legacy completions logprobs.
    r3 = c.client.completions.create(model=c.model, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=2)
    l3 = r3.choices[0].logprobs
    check(l3 is not None and len(l3.tokens) == len(l3.token_logprobs) == len(l3.top_logprobs), "completions logprobs malformed", l3)
    check(all(len(t) <= 2 for t in l3.top_logprobs), "completions: more than 2 top_logprobs", l3)


def case_logit_bias(c):
    r = c.chat(PROMPT, max_tokens=6, logprobs=True)
    lps = r.choices[0].logprobs.content
    check(lps, "no logprobs to find the first token", r)
    st, _, tk = c.http("POST", "/tokenize", {"model": c.model, "content": lps[0].token})
    check(st == 200 and len(tk["tokens"]) == 1, f"first token {lps[0].token!r} is not one token", short(tk))
    first = tk["tokens"][0]
    # -100 bans the greedy first token.
    r2 = c.chat(PROMPT, max_tokens=6, logprobs=True, logit_bias={str(first): -100})
    t2 = r2.choices[0].logprobs.content[0].token
    print(f"  greedy first token {lps[0].token!r} (id {first}); banned -> {t2!r}")
    check(t2 != lps[0].token, "logit_bias -100 did not ban the greedy token", t2)
    # +100 makes one token win every step.
    st, _, tk = c.http("POST", "/tokenize", {"model": c.model, "content": " banana"})
    forced = tk["tokens"][-1]
    r3 = c.chat(PROMPT, max_tokens=4, logit_bias={str(forced): 100})
    st, _, d = c.http("POST", "/detokenize", {"model": c.model, "tokens": [forced] * 4})
    print(f"  +100 on {forced}: {r3.choices[0].message.content!r}")
    check(r3.choices[0].message.content == d["content"], "logit_bias +100 did not force the token",
          repr(r3.choices[0].message.content), repr(d["content"]))


def case_stop(c):
    content = "List the days of the week, one per line."
    base = c.chat(content, max_tokens=40)
    text = base.choices[0].message.content
    print(f"  greedy: {text!r}")
    check(len(text) >= 12, "greedy text too short to pick a stop string from", text)
    mid = len(text) // 2
    stop = None
    for start in range(mid, len(text) - 4):
        cand = text[start:start + 4]
        if cand.strip() == cand and cand.strip():
            stop = cand
            break
    check(stop is not None, "no stop string candidate", text)
    want = text[: text.index(stop)]
    print(f"  stop={stop!r}: expect {want!r}")
    for how in ("non-streamed", "streamed"):
        if how == "non-streamed":
            r = c.chat(content, max_tokens=40, stop=[stop])
            got, finish = r.choices[0].message.content, r.choices[0].finish_reason
        else:
            got, finish, _, _ = c.stream_chat(content, max_tokens=40, stop=[stop])
        check(stop not in got, f"{how}: the stop string appears in the output", f"stop={stop!r}", f"got {got!r}")
        check(got == want, f"{how}: output is not the prefix before the stop string",
              f"stop={stop!r}", f"got:  {got!r}", f"want: {want!r}")
        check(finish == "stop", f"{how}: finish_reason {finish!r}, want 'stop'")
    # A plain string stop works too.
    r = c.chat(content, max_tokens=40, stop=stop)
    check(r.choices[0].message.content == want, "stop as a string differs from stop as a list")


def case_seed(c):
    kw = dict(temperature=0.8, seed=42, max_tokens=24)
    a = c.chat(PROMPT, **kw).choices[0].message.content
    b = c.chat(PROMPT, **kw).choices[0].message.content
    print(f"  seed 42: {a!r}")
    check(a == b, "same seed, different output", repr(a), repr(b))
    s, _, _, _ = c.stream_chat(PROMPT, **kw)
    check(s == a, "same seed, streamed differs from non-streamed", repr(s), repr(a))
    d = c.chat(PROMPT, temperature=0.8, seed=43, max_tokens=24).choices[0].message.content
    print(f"  seed 43: {d!r} ({'differs' if d != a else 'same as seed 42'})")


def case_length(c):
    r = c.chat("Write a long story about a dragon who learns to fly.", max_tokens=5)
    ch = r.choices[0]
    print(f"  {ch.message.content!r} ({ch.finish_reason}, {r.usage})")
    check(ch.finish_reason == "length", f"finish_reason {ch.finish_reason!r}, want 'length'")
    check(r.usage.completion_tokens == 5, f"completion_tokens {r.usage.completion_tokens}, want 5")
    # max_completion_tokens is the newer name.
    r = c.client.chat.completions.create(model=c.model, messages=[{"role": "user", "content": "Tell me a story."}],
                                         temperature=0, max_completion_tokens=3)
    check(r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length",
          "max_completion_tokens=3 not honoured", r.usage, r.choices[0].finish_reason)


def case_json(c):
    prompts = [
        ("Describe a cat as a JSON object with the keys \"name\" (a string) and \"age\" (a number).", 200),
        ("Reply with only this JSON object and nothing else: {\"name\": \"Tom\", \"age\": 3}", 400),
    ]
    # A small max_tokens: the guard closes the object within it, so even a cut reply parses.
    for mt in (1, 3, 7, 12):
        for seed in (1, 2):
            r = c.chat(prompts[0][0], max_tokens=mt, temperature=1, seed=seed, response_format={"type": "json_object"})
            out = r.choices[0].message.content
            check(r.usage.completion_tokens <= mt, f"json_object max_tokens={mt}: {r.usage.completion_tokens} tokens")
            try:
                check(isinstance(json.loads(out), dict), f"json_object max_tokens={mt}: not an object", out)
            except ValueError as e:
                raise Failure(f"json_object max_tokens={mt} seed={seed} does not parse: {e}: {out!r}")
        print(f"  json_object max_tokens={mt}: {out!r}")
    last = None
    for p, mt in prompts:
        r = c.chat(p, max_tokens=mt, response_format={"type": "json_object"})
        ch = r.choices[0]
        last = (p, ch.message.content, ch.finish_reason)
        print(f"  json_object ({ch.finish_reason}, {r.usage.completion_tokens} tokens): {short(ch.message.content, 300)!r}")
        if ch.finish_reason == "length":
            continue
        try:
            v = json.loads(ch.message.content)
        except ValueError as e:
            raise Failure(f"json_object output does not parse: {e}\n    prompt: {p!r}\n    content: {ch.message.content!r}")
        check(isinstance(v, dict), f"json_object output is a {type(v).__name__}, not an object", ch.message.content)
        return
    raise Failure(f"json_object: every attempt hit the length limit; last: {last!r}")


def case_json_schema(c):
    """response_format json_schema: the SDK's own structured-output path (a pydantic model with
    nested models, enums, optionals and lists; `parse` validates the reply) and a raw schema,
    streamed; a forced tool call's arguments follow the tool's parameter schema; bad schemas and
    a max_tokens too small for the schema are 400s."""
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(min_length=1, max_length=12)
        species: Literal["cat", "dog", "bird"]
        age: int = Field(ge=0)
        legs: int = Field(gt=0)
        vaccinated: bool
        nickname: Optional[str]
        toys: list[str]

    class Household(BaseModel):
        owner: str
        city: str
        pets: list[Pet]

    parse = getattr(c.client.chat.completions, "parse", None) or c.client.beta.chat.completions.parse
    for seed in (1, 2, 3):
        r = parse(model=c.model, messages=[{"role": "user", "content": "Describe a household with two pets as JSON."}],
                  response_format=Household, max_tokens=300, temperature=0.8, seed=seed)
        ch = r.choices[0]
        check(ch.finish_reason == "stop", f"finish_reason {ch.finish_reason!r}", ch.message.content)
        h = ch.message.parsed
        check(isinstance(h, Household), f"parsed is {type(h).__name__}", ch.message.content)
        # Keys in the schema's order, as OpenAI's strict mode writes them.
        check(list(json.loads(ch.message.content)) == ["owner", "city", "pets"], "key order", ch.message.content)
        print(f"  parse(Household) seed={seed}: {short(ch.message.content, 200)!r}")

    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "year": {"type": "integer"},
            "rating": {"type": "number"},
            "genre": {"enum": ["drama", "comedy", "horror", "sci-fi"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["title", "year", "genre", "tags"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": "Recommend a movie."}]
    st = c.client.chat.completions.create(model=c.model, messages=msgs, response_format=rf, max_tokens=120,
                                          temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in st if ch.choices)
    whole = c.client.chat.completions.create(model=c.model, messages=msgs, response_format=rf, max_tokens=120,
                                             temperature=0).choices[0].message.content
    check(text == whole, "streamed json_schema reply differs", text, whole)
    v = json.loads(text)
    check(set(v) - set(schema["properties"]) == set() and {"title", "year", "genre", "tags"} <= set(v), "keys", text)
    check(isinstance(v["year"], int) and v["genre"] in schema["properties"]["genre"]["enum"], "types", text)
    check(1 <= len(v["tags"]) <= 3 and all(isinstance(t, str) for t in v["tags"]), "tags", text)
    print(f"  raw schema, streamed: {short(text, 200)!r}")

    # vLLM's guided_json (here as JSON text), llama.cpp's json_schema and json_object + schema.
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
             "required": ["ok", "n"], "additionalProperties": False}
    for extra in ({"guided_json": json.dumps(small)}, {"json_schema": small},
                  {"response_format": {"type": "json_object", "schema": small}}):
        kw = {"response_format": extra.pop("response_format")} if "response_format" in extra else {}
        r = c.client.chat.completions.create(model=c.model, messages=msgs, max_tokens=40, temperature=1, seed=4,
                                             extra_body=extra or None, **kw)
        v = json.loads(r.choices[0].message.content)
        check(list(v) == ["ok", "n"] and isinstance(v["ok"], bool) and v["n"] in (1, 2, 3), f"{extra or kw}", v)
    print("  guided_json / json_schema / json_object+schema: ok")

    # A forced call: the arguments follow the tool's parameters.
    tool = {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object",
        "properties": {"hour": {"type": "integer"}, "minute": {"type": "integer"}, "days": {
            "type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}}},
        "required": ["hour", "minute", "days"], "additionalProperties": False}}}
    r = c.client.chat.completions.create(model=c.model, messages=[{"role": "user", "content": "Wake me at 7."}],
                                         tools=[tool], tool_choice={"type": "function", "function": {"name": "set_alarm"}},
                                         max_tokens=100, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    a = json.loads(call.function.arguments)
    check(list(a) == ["hour", "minute", "days"] and isinstance(a["hour"], int) and isinstance(a["minute"], int),
          "forced call arguments", call.function.arguments)
    check(all(d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") for d in a["days"]), "days", call.function.arguments)
    print(f"  forced call set_alarm({call.function.arguments})")

    base = {"model": c.model, "messages": msgs}
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "text"}}}}}
    for name, extra, param in [
        ("schema not an object", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string"}}}}, "response_format.json_schema.schema"),
        ("dangling $ref", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}}}}, "response_format.json_schema.schema"),
        ("json_schema not an object", {"response_format": {"type": "json_schema", "json_schema": "movie"}},
         "response_format.json_schema"),
        ("max_tokens too small", {"response_format": rf, "max_tokens": 5}, "max_tokens"),
        ("guided_json not JSON", {"guided_json": "{not json"}, "guided_json"),
        ("bad tool parameters", {"tools": [bad_tool], "tool_choice": "required"}, "tools"),
    ]:
        expect_400(c, name, {**base, **extra}, param)


def make_tools(n=36):
    """OpenWebUI-sized tool definitions (~25 KB of JSON)."""
    tools = []
    for i in range(n):
        tools.append({
            "type": "function",
            "function": {
                "name": f"tool_{i:02d}_" + ["search_web", "get_weather", "run_code", "read_file", "send_mail", "query_db"][i % 6],
                "description": (f"Tool number {i}. " + "Performs an operation on behalf of the user and returns "
                                "a structured result; use it when the user explicitly asks for it."),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "The text to act on, as the user phrased it."},
                        "limit": {"type": "integer", "description": "Most results to return (default 10).", "minimum": 1},
                        "mode": {"type": "string", "enum": ["fast", "thorough", "balanced"], "description": "Speed/quality trade-off."},
                        "options": {"type": "object", "description": "Extra options, passed through unchanged.",
                                    "properties": {"lang": {"type": "string"}, "safe": {"type": "boolean"}}},
                    },
                    "required": ["query"],
                },
            },
        })
    return tools


def case_openwebui(c):
    tools = make_tools()
    size = len(json.dumps(tools))
    print(f"  {len(tools)} tools, {size} bytes of tools JSON")
    check(size > 20000, f"tools JSON only {size} bytes")
    # OpenWebUI sends the raw body; use raw HTTP for the exact shape, then the SDK for the stream.
    body = {
        "model": c.model,
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of Italy?"},
        ],
        "tools": tools,
        "max_tokens": 48,
    }
    t = time.time()
    s = c.client.chat.completions.create(**body)
    text, finish, n = "", None, 0
    for x in s:
        n += 1
        for ch in x.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    print(f"  tools+stream: {n} chunks in {time.time() - t:.1f}s, finish {finish}: {short(text, 200)!r}")
    check(finish in ("stop", "length", "tool_calls"), f"tools+stream: finish_reason {finish!r}")
    check(n >= 2, "tools+stream: no chunks")
    # Title generation: no max_tokens.
    t = time.time()
    st, _, r = c.http("POST", "/v1/chat/completions", {
        "model": c.model,
        "stream": False,
        "messages": [{"role": "user", "content": "Create a concise, 3-5 word title for: How do I bake sourdough bread at home?"}],
    })
    check(st == 200, f"title request: {st}", short(r))
    title = r["choices"][0]["message"]["content"]
    print(f"  title in {time.time() - t:.1f}s ({r['choices'][0]['finish_reason']}, {r['usage']}): {short(title, 200)!r}")
    check(title.strip(), "empty title", short(r))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_history():
    """A conversation with a tool call and its result, as an OpenAI client sends it."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
        ]},
        {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
        {"role": "user", "content": "And what is the weather in Rome?"},
    ]


def few_shot_calls():
    """Three questions each answered by a tool call, then a fourth: SmolLM2-135M follows the
    pattern (greedy, on every backend), so the reply is a tool call."""
    msgs = []
    for i, city in enumerate(["Paris", "Berlin", "Madrid"]):
        msgs.append({"role": "user", "content": f"Weather in {city}?"})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
        ]})
    msgs.append({"role": "user", "content": "Weather in Rome?"})
    return msgs


def tool_reply(msg, finish, where):
    """(content, [(name, arguments)]) of a non-streamed reply, checked for OpenAI's shape."""
    calls = []
    if msg.tool_calls:
        check(finish in ("tool_calls", "length"), f"{where}: tool_calls with finish_reason {finish!r}")
        for tc in msg.tool_calls:
            check(tc.type == "function", f"{where}: tool call type {tc.type!r}", tc)
            check(re.fullmatch(r"call_[0-9a-f]{24}", tc.id or ""), f"{where}: tool call id {tc.id!r}", tc)
            check(tc.function.name, f"{where}: tool call without a name", tc)
            try:
                json.loads(tc.function.arguments)
            except ValueError:
                raise Failure(f"{where}: arguments are not JSON: {tc.function.arguments!r}")
            calls.append((tc.function.name, tc.function.arguments))
        check(len({tc.id for tc in msg.tool_calls}) == len(msg.tool_calls), f"{where}: tool call ids repeat", msg)
    else:
        check(finish in ("stop", "length"), f"{where}: finish_reason {finish!r} without tool calls")
        check(isinstance(msg.content, str), f"{where}: content is {msg.content!r}")
    return msg.content or "", calls


def stream_tool_reply(c, where, **kw):
    """(content, [(name, arguments)], finish) of a streamed reply, with the tool-call deltas checked."""
    content, calls, finish = "", {}, None
    for x in c.client.chat.completions.create(stream=True, **kw):
        for ch in x.choices:
            check(finish is None, f"{where}: a chunk after the one with finish_reason", x)
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                check(tc.index is not None, f"{where}: tool call delta without index", tc)
                cur = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    check(re.fullmatch(r"call_[0-9a-f]{24}", tc.id), f"{where}: tool call id {tc.id!r}", tc)
                    cur["id"] = tc.id
                if tc.function:
                    cur["name"] += tc.function.name or ""
                    cur["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    check(sorted(calls) == list(range(len(calls))), f"{where}: tool call indexes {sorted(calls)}")
    check(all(v["id"] for v in calls.values()), f"{where}: a streamed tool call has no id", calls)
    if calls:
        check(finish in ("tool_calls", "length"), f"{where}: streamed tool_calls with finish_reason {finish!r}")
    else:
        check(finish in ("stop", "length"), f"{where}: streamed finish_reason {finish!r}")
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in range(len(calls))], finish


def case_tools(c):
    """Against a chat template that takes tools: history with tool calls and results reaches it, and
    replies come back in OpenAI's shape, the same streamed as not: whatever the model writes after
    a tool result (text here), and a tool call after a few-shot history."""
    kw = dict(model=c.model, messages=tool_history(), tools=[WEATHER_TOOL], temperature=0, max_tokens=32)
    r = c.client.chat.completions.create(**kw)
    ch = r.choices[0]
    content, calls = tool_reply(ch.message, ch.finish_reason, "tools")
    print(f"  tools: content {short(content, 200)!r}, tool_calls {calls} ({ch.finish_reason}, {r.usage})")
    check_usage(r.usage, 32, "tools")
    s_content, s_calls, s_finish = stream_tool_reply(c, "tools stream", **kw)
    check((s_content, s_calls, s_finish) == (content, calls, ch.finish_reason),
          "streamed reply != non-streamed reply (greedy)",
          f"streamed: {(s_content, s_calls, s_finish)!r}", f"non-streamed: {(content, calls, ch.finish_reason)!r}")
    # A reply that is a tool call: `<tool_call>` markup parsed into tool_calls, streamed or not.
    kw_calls = dict(kw, messages=few_shot_calls(), max_tokens=48)
    r3 = c.client.chat.completions.create(**kw_calls)
    ch3 = r3.choices[0]
    content3, calls3 = tool_reply(ch3.message, ch3.finish_reason, "tool call")
    print(f"  tool call: content {content3!r}, tool_calls {calls3} ({ch3.finish_reason})")
    check(ch3.finish_reason == "tool_calls" and len(calls3) == 1 and calls3[0][0] == "get_weather",
          "the few-shot request did not give one get_weather tool call", r3)
    check(ch3.message.content is None, f"tool call: content {ch3.message.content!r}, want null")
    check("city" in json.loads(calls3[0][1]), f"tool call arguments {calls3[0][1]!r} have no city")
    streamed3 = stream_tool_reply(c, "tool call stream", **kw_calls)
    check(streamed3 == (content3, calls3, ch3.finish_reason), "streamed tool call != non-streamed",
          f"streamed: {streamed3!r}", f"non-streamed: {(content3, calls3, ch3.finish_reason)!r}")
    # tool_choice none: the template gets no tools (a shorter prompt) and nothing is parsed.
    r2 = c.client.chat.completions.create(**kw, tool_choice="none")
    check(not r2.choices[0].message.tool_calls, "tool_choice none: tool_calls returned", r2)
    check(r2.usage.prompt_tokens < r.usage.prompt_tokens,
          f"the tools did not reach the template: {r.usage.prompt_tokens} prompt tokens with them, "
          f"{r2.usage.prompt_tokens} with tool_choice none")
    # Legacy `functions` work the same way.
    st, _, body = c.http("POST", "/v1/chat/completions", {
        "model": c.model, "messages": tool_history(), "functions": [WEATHER_TOOL["function"]],
        "temperature": 0, "max_tokens": 8})
    check(st == 200, f"functions: {st}", short(body))
    check(body["usage"]["prompt_tokens"] == r.usage.prompt_tokens,
          f"functions: {body['usage']['prompt_tokens']} prompt tokens, tools: {r.usage.prompt_tokens}")


TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}


def case_tool_choice(c):
    """tool_choice "required" or a named function forces a call (any template: the reply is
    constrained to `{"name", "arguments"}`), streamed the same as not; bad choices are 400s."""
    msgs = [{"role": "user", "content": "What is the weather in Rome?"}]
    for choice, want in [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
                         ("required", {"get_weather", "get_time"})]:
        kw = dict(model=c.model, messages=msgs, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice,
                  temperature=0, max_tokens=64)
        r = c.client.chat.completions.create(**kw)
        ch = r.choices[0]
        content, calls = tool_reply(ch.message, ch.finish_reason, f"tool_choice {choice}")
        print(f"  tool_choice {json.dumps(choice)}: {calls} ({ch.finish_reason}, {r.usage.completion_tokens} tokens)")
        check(ch.finish_reason == "tool_calls" and len(calls) == 1 and calls[0][0] in want,
              f"tool_choice {choice}: not one call to {want}", r)
        check(ch.message.content is None, f"tool_choice {choice}: content {ch.message.content!r}, want null")
        check(isinstance(json.loads(calls[0][1]), dict), f"arguments {calls[0][1]!r} are not an object")
        streamed = stream_tool_reply(c, f"tool_choice {choice} stream", **kw)
        check(streamed == (content, calls, ch.finish_reason), "streamed forced call != non-streamed",
              f"streamed: {streamed!r}", f"non-streamed: {(content, calls, ch.finish_reason)!r}")
    body = {"model": c.model, "messages": msgs, "tools": [WEATHER_TOOL], "max_tokens": 64}
    for name, extra, param in [
        ("unknown function", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ("required without tools", {"tool_choice": "required", "tools": []}, "tool_choice"),
        ("bad tool_choice", {"tool_choice": 5}, "tool_choice"),
        ("max_tokens too small", {"tool_choice": "required", "max_tokens": 5}, "max_tokens"),
    ]:
        expect_400(c, name, {**body, **extra}, param)


def case_tool_history(c):
    """Against a template that knows nothing of tools: tool history and tools still give a plain
    200 reply (tools are ignored, nothing is parsed as a tool call), streamed or not."""
    kw = dict(model=c.model, messages=tool_history(), tools=[WEATHER_TOOL], temperature=0, max_tokens=24)
    r = c.client.chat.completions.create(**kw)
    ch = r.choices[0]
    print(f"  tool history: {short(ch.message.content, 200)!r} ({ch.finish_reason})")
    check(not ch.message.tool_calls, "tool_calls from a template without tools", r)
    check(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
    check(isinstance(ch.message.content, str), f"content is {ch.message.content!r}")
    content, calls, finish = stream_tool_reply(c, "tool history stream", **kw)
    check((content, calls, finish) == (ch.message.content, [], ch.finish_reason),
          "streamed reply != non-streamed reply", (content, calls, finish), (ch.message.content, ch.finish_reason))


def _stream_worker(c, content, max_tokens, out, i):
    t = time.time()
    try:
        text, finish, usage, chunks = c.stream_chat(content, max_tokens=max_tokens, stream_options={"include_usage": True})
        out[i] = dict(text=text, finish=finish, tokens=usage.completion_tokens if usage else 0, secs=time.time() - t)
    except Exception as e:  # noqa: BLE001
        out[i] = dict(error=f"{type(e).__name__}: {e}", secs=time.time() - t)


def case_concurrency(c):
    topics = ["the ocean", "mountains", "a city at night", "a robot", "the moon", "a forest", "a train journey", "winter"]
    prompts = [f"Write a long, detailed story about {t}." for t in topics]
    mt = 64
    # Warm up (first request pays for template compilation etc.).
    c.chat("Hi", max_tokens=4)
    alone = [None]
    _stream_worker(c, prompts[0], mt, alone, 0)
    a = alone[0]
    check("error" not in a, f"single request failed: {a.get('error')}")
    single_tps = a["tokens"] / a["secs"]
    res = [None] * len(prompts)
    t = time.time()
    th = [threading.Thread(target=_stream_worker, args=(c, p, mt, res, i)) for i, p in enumerate(prompts)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    wall = time.time() - t
    errors = [(i, r["error"]) for i, r in enumerate(res) if "error" in r]
    check(not errors, f"concurrent requests failed: {errors}")
    total = sum(r["tokens"] for r in res)
    agg_tps = total / wall
    speedup = agg_tps / single_tps if single_tps else 0.0
    print(f"  single request: {a['tokens']} tokens in {a['secs']:.2f}s = {single_tps:.1f} tok/s")
    print(f"  8 concurrent:   {total} tokens in {wall:.2f}s = {agg_tps:.1f} tok/s aggregate "
          f"(per request {min(r['secs'] for r in res):.2f}-{max(r['secs'] for r in res):.2f}s)")
    print(f"  speed-up: {speedup:.2f}x")
    for i, r in enumerate(res):
        check(r["text"].strip(), f"concurrent request {i} gave empty text", r)
    check(res[0]["text"] == a["text"], "greedy output differs alone vs among 8 concurrent requests",
          f"alone:      {a['text']!r}", f"concurrent: {res[0]['text']!r}")
    if os.environ.get("PUREHW_ASSERT_SPEEDUP") == "1":
        check(speedup >= 3.0, f"aggregate speed-up {speedup:.2f}x < 3x")


CHAT_SYSTEM = "You are a helpful assistant. Answer briefly."
CONVERSATIONS = [
    ["Hi! Who are you?", "What is the capital of France?", "Tell me one fact about it.",
     "What river runs through it?", "Name a famous museum there.", "Thanks! Sum up our chat in one sentence."],
    ["What is 2 + 2?", "And 3 + 5?", "Which of those is larger?", "Is 8 an even number?",
     "Name a prime number.", "Thank you, goodbye."],
    ["Name a colour.", "Name a fruit of that colour.", "Is it sweet?", "Where does it grow?",
     "Name an animal.", "What does it eat?"],
]


def conversation(c, turns, max_tokens):
    """(replies, usages) of a conversation sent whole each turn, as chat UIs do; the even turns
    streamed with stream_options.include_usage."""
    msgs = [{"role": "system", "content": CHAT_SYSTEM}]
    replies, usages = [], []
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        kw = dict(model=c.model, messages=msgs, temperature=0, max_tokens=max_tokens)
        if i % 2:
            text, usage = "", None
            for ch in c.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                if ch.usage is not None:
                    usage = ch.usage
                for x in ch.choices:
                    if x.delta and x.delta.content:
                        text += x.delta.content
        else:
            r = c.client.chat.completions.create(**kw)
            text, usage = r.choices[0].message.content, r.usage
        check_usage(usage, max_tokens, f"turn {i + 1}")
        replies.append(text)
        usages.append(usage)
        msgs.append({"role": "assistant", "content": text})
    return replies, usages


def check_cached(usages, on, where):
    """With the cache on, turns 2.. report cached prompt tokens; off, none."""
    for i, u in enumerate(usages):
        d = u.prompt_tokens_details
        check(d is not None and d.cached_tokens is not None, f"{where} turn {i + 1}: no prompt_tokens_details.cached_tokens", u)
        n = d.cached_tokens
        check(0 <= n < u.prompt_tokens, f"{where} turn {i + 1}: cached_tokens {n} of {u.prompt_tokens}")
        if on and i > 0:
            check(n > 0, f"{where} turn {i + 1}: cached_tokens = 0 with the prompt cache on", u)
        if not on:
            check(n == 0, f"{where} turn {i + 1}: cached_tokens = {n} with --no-prompt-cache", u)


def case_prompt_cache(c):
    """A 6-turn conversation at temperature 0, alone and then three at once. Run against a server
    with the prompt cache (PUREHW_PROMPT_CACHE=on, the default) and one with --no-prompt-cache
    (=off): the replies (written to $PUREHW_REPLIES_OUT for the caller to compare) must not
    change; with the cache, turns 2-6 report prompt_tokens_details.cached_tokens > 0."""
    on = os.environ.get("PUREHW_PROMPT_CACHE", "on") != "off"
    mt = c.mt(24)
    before = metrics_text(c)
    alone, usages = conversation(c, CONVERSATIONS[0], mt)
    for i, (u, r) in enumerate(zip(usages, alone)):
        print(f"  turn {i + 1}: prompt {u.prompt_tokens} ({u.prompt_tokens_details.cached_tokens} cached), "
              f"reply {u.completion_tokens}: {r!r}")
    check_cached(usages, on, "alone")
    res = [None] * len(CONVERSATIONS)

    def worker(i):
        try:
            res[i] = conversation(c, CONVERSATIONS[i], mt)
        except Exception as e:  # noqa: BLE001
            res[i] = e

    th = [threading.Thread(target=worker, args=(i,)) for i in range(len(CONVERSATIONS))]
    for x in th:
        x.start()
    for x in th:
        x.join()
    for i, r in enumerate(res):
        check(not isinstance(r, Exception), f"batched conversation {i}: {r!r}")
        check_cached(r[1], on, f"batched conversation {i}")
        print(f"  batched conversation {i}: cached " + ", ".join(str(u.prompt_tokens_details.cached_tokens) for u in r[1]))
    check(res[0][0] == alone, "the conversation's replies differ in a batch from alone",
          f"alone:   {alone!r}", f"batched: {res[0][0]!r}")
    m = metrics_text(c)
    delta = {k: metric(m, k) - (metric(before, k) or 0.0) for k in
             ["purehw_prompt_tokens_total", "purehw_prompt_tokens_cached_total", "purehw_prompt_tokens_computed_total"]}
    print(f"  /metrics: {delta}")
    check(delta["purehw_prompt_tokens_cached_total"] + delta["purehw_prompt_tokens_computed_total"] == delta["purehw_prompt_tokens_total"],
          f"cached + computed != prompt tokens: {delta}")
    check((delta["purehw_prompt_tokens_cached_total"] > 0) == on, f"cached prompt tokens with the cache {'on' if on else 'off'}: {delta}")
    out = os.environ.get("PUREHW_REPLIES_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"alone": alone, "batched": [r[0] for r in res]}, f, indent=1)


COPY_SYSTEM = (CHAT_SYSTEM + " You work for a small museum of clocks in a quiet town by a river. Visitors ask"
               " about opening hours (nine to five, closed on Mondays), tickets (five euros, children free), the"
               " oldest clock (a water clock from 1620), the workshop where clocks are repaired, the garden with"
               " its sundial, and the cafe on the first floor. Keep every answer short and friendly, and never"
               " invent facts that are not written here.")


def case_prompt_copy(c):
    """Two chats sharing a long system prompt on different KV slots: the second arrives while the
    first is still replying (streamed), so the second's slot holds none of the prefix and the
    server copies it from the first's slot on the device. Run against a server with the cache
    (PUREHW_PROMPT_CACHE=on) and one with --no-prompt-cache (=off): the temperature-0 replies
    (written to $PUREHW_REPLIES_OUT for the caller to compare) must not change; with the cache the
    second reports cached_tokens > 0 and purehw_prompt_tokens_copied_total grows (by at most that)."""
    on = os.environ.get("PUREHW_PROMPT_CACHE", "on") != "off"
    before = metrics_text(c)
    msgs = lambda q: [{"role": "system", "content": COPY_SYSTEM}, {"role": "user", "content": q}]
    # Not capped by --max-tokens: the first reply must still run when the second is scheduled.
    stream = c.client.chat.completions.create(model=c.model, messages=msgs("Count from 1 to 80, separated by commas."),
                                              temperature=0, max_tokens=160, stream=True,
                                              stream_options={"include_usage": True})
    first, first_usage = "", None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            first += ch.choices[0].delta.content
            break
    second = c.client.chat.completions.create(model=c.model, messages=msgs("When is the museum open?"),
                                              temperature=0, max_tokens=c.mt(24))
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            first += ch.choices[0].delta.content
        if ch.usage is not None:
            first_usage = ch.usage
    u = second.usage
    cached = u.prompt_tokens_details.cached_tokens
    print(f"  first: {first_usage.completion_tokens} tokens {first[:60]!r}...; second: prompt {u.prompt_tokens} "
          f"({cached} cached): {second.choices[0].message.content!r}")
    check(first_usage.completion_tokens > 20, "the first reply ended too soon to overlap the second", first)
    m = metrics_text(c)
    copied = metric(m, "purehw_prompt_tokens_copied_total") - (metric(before, "purehw_prompt_tokens_copied_total") or 0.0)
    print(f"  copied prompt tokens: {copied:.0f}")
    if on:
        check(cached > u.prompt_tokens // 2, f"the second request reused {cached} of {u.prompt_tokens} prompt tokens")
        check(0 < copied <= cached, f"{copied} tokens copied, {cached} cached (from the first request's slot)")
    else:
        check(cached == 0 and copied == 0, f"--no-prompt-cache: {cached} cached, {copied} copied")
    out = os.environ.get("PUREHW_REPLIES_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"first": first, "second": second.choices[0].message.content}, f, indent=1)


def case_errors(c):
    chat_body = {"model": c.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    seen = []

    def expect(name, resp, want_status, param=None):
        st, hdrs, body = resp
        seen.append((name, st))
        check_error_shape(st, body, name)
        check(st == want_status, f"{name}: status {st}, want {want_status}", short(body))
        if param is not None:
            check(body["error"]["param"] == param, f"{name}: param {body['error']['param']!r}, want {param!r}", short(body))
        print(f"  {name}: {st} {short(body['error']['message'], 120)!r}")

    expect("malformed JSON", c.http("POST", "/v1/chat/completions", raw=b'{"model": "x", "messages": ['), 400)
    expect("not an object", c.http("POST", "/v1/chat/completions", raw=b"[1, 2]"), 400)
    expect("empty body", c.http("POST", "/v1/chat/completions", raw=b""), 400)
    expect("temperature 5", c.http("POST", "/v1/chat/completions", {**chat_body, "temperature": 5}), 400, "temperature")
    expect("n=2", c.http("POST", "/v1/chat/completions", {**chat_body, "n": 2}), 400, "n")
    expect("max_tokens 0", c.http("POST", "/v1/chat/completions", {**chat_body, "max_tokens": 0}), 400, "max_tokens")
    expect("top_p as string", c.http("POST", "/v1/chat/completions", {**chat_body, "top_p": "high"}), 400, "top_p")
    expect("no messages", c.http("POST", "/v1/chat/completions", {"model": c.model}), 400, "messages")
    expect("bad role", c.http("POST", "/v1/chat/completions",
                                      {**chat_body, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    expect("logit_bias key", c.http("POST", "/v1/chat/completions", {**chat_body, "logit_bias": {"x": 1}}), 400, "logit_bias")
    expect("logit_bias 101", c.http("POST", "/v1/chat/completions", {**chat_body, "logit_bias": {"5": 101}}), 400, "logit_bias")
    expect("logit_bias id", c.http("POST", "/v1/chat/completions",
                                   {**chat_body, "logit_bias": {"99999999": 1}}), 400, "logit_bias")
    expect("best_of 2", c.http("POST", "/v1/completions", {"model": c.model, "prompt": "x", "best_of": 2}), 400, "best_of")
    expect("echo + logprobs", c.http("POST", "/v1/completions",
                                     {"model": c.model, "prompt": "x", "echo": True, "logprobs": 1}), 400, "echo")
    expect("no prompt", c.http("POST", "/v1/completions", {"model": c.model}), 400, "prompt")
    expect("token id out of range", c.http("POST", "/v1/completions",
                                                   {"model": c.model, "prompt": [1, 2, 99999999]}), 400, "prompt")
    expect("unknown model", c.http("POST", "/v1/chat/completions", {**chat_body, "model": "no-such-model"}), 404, "model")
    expect("unknown model (GET)", c.http("GET", "/v1/models/no-such-model"), 404)
    expect("unknown route", c.http("GET", "/v1/no/such/route"), 404)
    expect("unknown route (POST)", c.http("POST", "/v1/embeddings", {"model": c.model, "input": "x"}), 404)
    expect("wrong method", c.http("GET", "/v1/chat/completions"), 405)
    # The SDK maps these to its exception classes.
    try:
        c.chat("Hi", max_tokens=4, temperature=5)
        raise Failure("SDK: temperature=5 did not raise")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"SDK BadRequestError status {e.status_code}")
    try:
        c.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise Failure("SDK: unknown model did not raise")
    except openai.NotFoundError:
        pass
    # And the server still serves.
    r = c.chat("Hi", max_tokens=4)
    check(r.choices[0].message.content is not None, "chat after errors failed")


def case_body_limit(c):
    check(c.max_body, "body_limit needs --max-body")
    big = {"model": c.model, "messages": [{"role": "user", "content": "x " * c.max_body}], "max_tokens": 2}
    st, _, body = c.http("POST", "/v1/chat/completions", big)
    print(f"  {len(json.dumps(big))}-byte body: {st} {short(body, 200)}")
    check_error_shape(st, body, "oversized body")
    check(st == 413, f"oversized body: status {st}, want 413", short(body))
    r = c.chat("Hi", max_tokens=4)
    check(r.choices[0].message.content is not None, "a small request after the 413 failed")


def case_auth(c):
    check(c.api_key, "auth needs --api-key")
    for name, hdr, want in [("missing key", None, 401), ("wrong key", "Bearer wrong", 401), ("right key", f"Bearer {c.api_key}", 200)]:
        st, _, body = c.http("GET", "/v1/models", headers={"Authorization": hdr})
        print(f"  {name}: {st}")
        check(st == want, f"{name}: status {st}, want {want}", short(body))
        if want != 200:
            check_error_shape(st, body, name)
    st, _, body = c.http("POST", "/v1/chat/completions", {"model": c.model, "messages": [{"role": "user", "content": "x"}]},
                         headers={"Authorization": None})
    check(st == 401, f"chat without key: {st}", short(body))
    st, _, _ = c.http("GET", "/health", headers={"Authorization": None})
    check(st == 200, f"/health without key: {st} (should stay open)")
    # The SDK with the key works, with a wrong one raises AuthenticationError.
    check(c.model in [m.id for m in c.client.models.list().data], "SDK models.list() with the key")
    r = c.chat("Hi", max_tokens=4)
    check(r.choices[0].message.content is not None, "SDK chat with the key")
    bad = OpenAI(base_url=c.base, api_key="wrong", max_retries=0, timeout=c.timeout)
    try:
        bad.models.list()
        raise Failure("SDK with a wrong key did not raise")
    except openai.AuthenticationError:
        pass


def case_queue(c):
    """Run against --parallel 1 --queue 1: more long requests at once than slot + queue."""
    n = 6
    out = [None] * n
    body = {"model": c.model, "messages": [{"role": "user", "content": "Write a long story about a knight."}],
            "max_tokens": 96, "temperature": 0}

    def go(i):
        out[i] = c.http("POST", "/v1/chat/completions", body)

    th = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    statuses = [o[0] for o in out]
    print(f"  statuses: {statuses}")
    check(500 not in statuses, "a 500 among the responses", [short(o[2]) for o in out])
    check(all(s in (200, 429) for s in statuses), "statuses other than 200/429", [short(o[2]) for o in out])
    check(statuses.count(200) >= 1, "no request succeeded")
    check(statuses.count(429) >= 1, f"no 429 with {n} requests on --parallel 1 --queue 1")
    for st, hdrs, b in out:
        if st == 429:
            check_error_shape(st, b, "429")
            ra = {k.lower(): v for k, v in hdrs.items()}.get("retry-after")
            check(ra is not None and ra.strip().isdigit(), f"429 without a numeric Retry-After (headers {hdrs})")
    # Once the queue drains, requests succeed again; the SDK retries 429s itself.
    retrying = OpenAI(base_url=c.base, api_key=c.api_key or "sk-anything", max_retries=3, timeout=c.timeout)
    r = retrying.chat.completions.create(model=c.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    check(r.choices[0].message.content is not None, "request after the burst failed")


def case_context(c):
    check(c.ctx_size, "context needs --ctx-size")
    long_text = " ".join(f"word{i}" for i in range(c.ctx_size * 2))
    for path, body in [
        ("/v1/chat/completions", {"model": c.model, "messages": [{"role": "user", "content": long_text}], "max_tokens": 4}),
        ("/v1/completions", {"model": c.model, "prompt": long_text, "max_tokens": 4}),
    ]:
        st, _, b = c.http("POST", path, body)
        print(f"  {path}: {st} {short(b, 240)}")
        check_error_shape(st, b, f"context overflow {path}")
        check(st == 400, f"context overflow {path}: status {st}, want 400", short(b))
        check(str(c.ctx_size) in b["error"]["message"], f"the message does not mention the limit {c.ctx_size}", short(b))
    # Also streamed: the error comes before any stream starts.
    st, _, b = c.http("POST", "/v1/chat/completions",
                      {"model": c.model, "messages": [{"role": "user", "content": long_text}], "stream": True})
    check(st == 400, f"streamed context overflow: {st}", short(b))
    # A short prompt with max_tokens past the context: no 500, ends by length within the context.
    st, _, b = c.http("POST", "/v1/chat/completions",
                      {"model": c.model, "messages": [{"role": "user", "content": "Count to one thousand."}],
                       "max_tokens": 4 * c.ctx_size, "temperature": 0})
    print(f"  max_tokens {4 * c.ctx_size} > ctx: {st} {short(b['usage'] if st == 200 else b, 200)}")
    check(st in (200, 400), f"max_tokens past the context: status {st}", short(b))
    if st == 200:
        u = b["usage"]
        check(u["total_tokens"] <= c.ctx_size, f"generated past the context: {u}")
    else:
        check_error_shape(st, b, "max_tokens past the context")


def metric(text, name):
    """Sum of a metric's samples (over labels)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def metrics_text(c):
    st, hdrs, body = c.http("GET", "/metrics")
    check(st == 200 and isinstance(body, str), f"/metrics: {st}", short(body))
    return body


def case_disconnect(c):
    before = metric(metrics_text(c), "purehw_requests_cancelled_total") or 0.0
    u = urllib.parse.urlsplit(c.root)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=c.timeout)
    body = json.dumps({"model": c.model, "stream": True, "max_tokens": 2000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]})
    hdrs = {"Content-Type": "application/json"}
    if c.api_key:
        hdrs["Authorization"] = f"Bearer {c.api_key}"
    conn.request("POST", "/v1/chat/completions", body=body, headers=hdrs)
    resp = conn.getresponse()
    if resp.status != 200:
        raise Failure(f"stream: {resp.status}\n    {resp.read()[:500]!r}")
    chunks, finished = 0, False
    while chunks < 5:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            chunks += 1
            if b"[DONE]" in line or b'"finish_reason":"' in line:
                finished = True
                break
    check(chunks >= 3, f"only {chunks} chunks before the stream ended")
    # Hang up mid-stream.
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
    print(f"  read {chunks} chunks, closed the connection ({'stream had finished' if finished else 'mid-stream'})")
    # The sequence leaves the batch and its KV cache is freed within a few seconds.
    deadline = time.time() + 10
    while True:
        m = metrics_text(c)
        running = metric(m, "purehw_running_sequences")
        kv = metric(m, "purehw_kv_cache_used_tokens")
        if running == 0 and kv in (None, 0.0):
            break
        if time.time() > deadline:
            raise Failure(f"10 s after the disconnect: running_sequences={running}, kv_cache_used_tokens={kv}")
        time.sleep(0.2)
    print(f"  after disconnect: running_sequences={running:g}, kv_cache_used_tokens={kv}")
    # The server goes on serving.
    r = c.chat("Hi", max_tokens=8)
    check(r.choices[0].message.content, "request after the disconnect failed", r)
    st, _, _ = c.http("GET", "/health")
    check(st == 200, f"/health after the disconnect: {st}")
    # And counts the generation as cancelled (unless it had already finished).
    cancelled = metric(metrics_text(c), "purehw_requests_cancelled_total") or 0.0
    print(f"  purehw_requests_cancelled_total: {before:g} -> {cancelled:g}")
    check(finished or cancelled > before,
          f"purehw_requests_cancelled_total stayed at {cancelled:g} after a client hung up mid-stream "
          "(the sequence was dropped, but not counted as cancelled)")


def case_metrics(c):
    c.chat("Hi", max_tokens=4)  # at least one generation, for the histograms
    s, _, _, _ = c.stream_chat("Hi", max_tokens=4)
    m = metrics_text(c)
    for name in ["purehw_requests_total", "purehw_time_to_first_token_seconds_bucket", "purehw_time_to_first_token_seconds_count",
                 "purehw_queue_depth", "purehw_running_sequences", "purehw_kv_cache_used_ratio",
                 "purehw_generation_tokens_total", "purehw_prompt_tokens_total", "purehw_steps_total",
                 "purehw_step_sequences_total", "purehw_step_seconds_count"]:
        check(metric(m, name) is not None, f"/metrics has no {name}", short(m, 3000))
    check(metric(m, "purehw_steps_total") >= 1, "steps_total < 1")
    check(metric(m, "purehw_step_sequences_total") >= metric(m, "purehw_steps_total"), "fewer step sequences than steps")
    check(metric(m, "purehw_step_seconds_count") == metric(m, "purehw_steps_total"), "step_seconds count != steps_total")
    check(re.search(r'purehw_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', m),
          "purehw_requests_total has no chat 200s", short(m, 3000))
    check(metric(m, "purehw_time_to_first_token_seconds_count") >= 2, "TTFT histogram count < 2")
    check(metric(m, "purehw_generation_tokens_total") >= 4, "generation_tokens_total < 4")
    check(re.search(r"# TYPE purehw_time_to_first_token_seconds histogram", m), "TTFT is not typed as a histogram")
    print(f"  /metrics: {len(m.splitlines())} lines; queue_depth={metric(m, 'purehw_queue_depth'):g} "
          f"kv_ratio={metric(m, 'purehw_kv_cache_used_ratio'):g}")


def case_device_metrics(c):
    """A device backend (vulkan) reports its memory and device time per step in /metrics."""
    c.client.completions.create(model=c.model, prompt="Hi", max_tokens=1)  # at least one step
    m = metrics_text(c)
    for name in ["purehw_device_memory_used_bytes", "purehw_device_memory_budget_bytes", "purehw_step_device_seconds_count"]:
        check((metric(m, name) or 0) > 0, f"/metrics: {name} is missing or 0", short(m, 4000))
    check(re.search(r'purehw_device_memory_used_bytes\{model="[^"]+",backend="vulkan",device="[^"]+"\} \d+', m),
          "purehw_device_memory_used_bytes has no backend/device labels", short(m, 4000))
    check(re.search(r"# TYPE purehw_step_device_seconds histogram", m), "purehw_step_device_seconds is not a histogram")
    used, budget = metric(m, "purehw_device_memory_used_bytes"), metric(m, "purehw_device_memory_budget_bytes")
    steps, secs = metric(m, "purehw_step_device_seconds_count"), metric(m, "purehw_step_device_seconds_sum")
    print(f"  device memory {used / 2**20:.0f} of {budget / 2**20:.0f} MiB; {steps:g} steps, "
          f"{1e3 * secs / steps:.1f} ms of device time each")


def case_device_lost(c):
    """The server runs with PUREHW_VK_FAULT=lost:4 (each device made is lost at its 4th step):
    a request in flight then gets a 503 (streamed: an error event), and the next one, on the device
    made again, is served."""
    body = {"model": c.model, "prompt": "One, two, three,", "max_tokens": 16, "temperature": 0}
    st, hdrs, b = c.http("POST", "/v1/completions", body)
    check_error_shape(st, b, "device lost")
    check(st == 503, f"device lost: {st}, want 503", short(b))
    check(b["error"]["code"] == "device_lost", f"device lost: code {b['error']['code']!r}", short(b))
    check("Retry-After" in hdrs or "retry-after" in hdrs, "device lost: no Retry-After", hdrs)
    print(f"  503 {short(b['error']['message'], 160)!r}")
    # Streamed: the stream ends with an error event, which the SDK raises.
    try:
        text, _, _, _ = c.stream_chat("Count from one to twenty.", max_tokens=16)
        raise Failure(f"a stream through a lost device ended without an error: {text!r}")
    except openai.APIError as e:
        check("lost" in str(e.body or e), "streamed error does not say the device was lost", e.body)
        print(f"  streamed: {type(e).__name__}: {short(str(e.body or e), 160)}")
    # The next request is served on the device made again (2 steps: before the 4th).
    r = c.client.completions.create(model=c.model, prompt="One, two, three,", max_tokens=2, temperature=0)
    ch = r.choices[0]
    print(f"  then: {ch.text!r} ({ch.finish_reason})")
    check(ch.text and ch.finish_reason == "length", "the request after the lost device failed", r)
    m = metrics_text(c)
    check((metric(m, "purehw_device_lost_total") or 0) >= 2, "purehw_device_lost_total < 2", short(m, 3000))
    st, _, h = c.http("GET", "/health")
    check(st == 200 and h.get("status") == "ok", f"/health after a lost device: {st}", short(h))


def case_tokenize(c):
    text = "Hello world! The quick brown fox jumps over the lazy dog."
    st, _, t = c.http("POST", "/tokenize", {"model": c.model, "content": text})
    check(st == 200 and isinstance(t, dict) and t.get("tokens"), f"/tokenize: {st}", short(t))
    ids = t["tokens"]
    check(all(isinstance(i, int) for i in ids), "/tokenize: tokens are not ints", ids)
    st, _, d = c.http("POST", "/detokenize", {"model": c.model, "tokens": ids})
    check(st == 200, f"/detokenize: {st}", short(d))
    print(f"  {len(ids)} tokens -> {d['content']!r}")
    check(d["content"] == text, "tokenize/detokenize round trip differs", repr(d["content"]), repr(text))
    st, _, p = c.http("POST", "/tokenize", {"model": c.model, "content": "Hello", "with_pieces": True})
    check(st == 200 and all("id" in x and "piece" in x for x in p["tokens"]), "/tokenize with_pieces", short(p))
    # Chat messages through the template: exactly the prompt a chat request is charged for.
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    st, _, m = c.http("POST", "/tokenize", {"model": c.model, "messages": msgs})
    check(st == 200 and m.get("count") == len(m.get("tokens", [])), "/tokenize messages", short(m))
    r = c.client.chat.completions.create(model=c.model, messages=msgs, max_tokens=1)
    print(f"  messages: {m['count']} tokens; chat usage.prompt_tokens {r.usage.prompt_tokens}")
    check(m["count"] == r.usage.prompt_tokens, "/tokenize messages != chat prompt_tokens", m["count"], r.usage)


CASES = {
    "health": case_health,
    "models": case_models,
    "default_models": case_default_models,
    "tokenize": case_tokenize,
    "metrics": case_metrics,
    "chat": case_chat,
    "stream": case_stream,
    "completions": case_completions,
    "length": case_length,
    "logprobs": case_logprobs,
    "logit_bias": case_logit_bias,
    "stop": case_stop,
    "seed": case_seed,
    "json": case_json,
    "json_schema": case_json_schema,
    "openwebui": case_openwebui,
    "tools": case_tools,
    "tool_history": case_tool_history,
    "tool_choice": case_tool_choice,
    "concurrency": case_concurrency,
    "errors": case_errors,
    "disconnect": case_disconnect,
    "body_limit": case_body_limit,
    "auth": case_auth,
    "queue": case_queue,
    "context": case_context,
    "device_metrics": case_device_metrics,
    "device_lost": case_device_lost,
    "prompt_cache": case_prompt_cache,
    "prompt_copy": case_prompt_copy,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8006/v1")
    ap.add_argument("--model", required=True, help="the served model id")
    ap.add_argument("--api-key", default=None, help="the server's --api-key (default: none; the SDK gets a dummy)")
    ap.add_argument("--max-body", type=int, default=0, help="the server's --max-body (for body_limit)")
    ap.add_argument("--ctx-size", type=int, default=0, help="the server's --ctx-size (for context)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--max-tokens", type=int, default=0,
                    help="cap max_tokens of chat, stream and completions at this (slow backends; 0 = no cap)")
    ap.add_argument("cases", nargs="+", choices=sorted(CASES), metavar="CASE", help=" ".join(CASES))
    args = ap.parse_args()
    c = Ctx(args)
    failed = []
    for name in args.cases:
        t = time.time()
        print(f"--- {name}", flush=True)
        try:
            CASES[name](c)
            print(f"ok {name} ({time.time() - t:.1f}s)", flush=True)
        except Failure as e:
            print(f"FAIL {name}: {e}", flush=True)
            failed.append(name)
        except Exception as e:  # noqa: BLE001 — an SDK error is a failure of the case, with its details
            body = getattr(e, "body", None)
            print(f"FAIL {name}: {type(e).__name__}: {e}" + (f"\n    body: {short(body)}" if body else ""), flush=True)
            traceback.print_exc(file=sys.stdout)
            failed.append(name)
    if failed:
        print(f"FAILED: {' '.join(failed)}")
        sys.exit(1)
    print(f"all passed: {' '.join(args.cases)}")


if __name__ == "__main__":
    main()
