"""LangChain against a running `purehw serve`: plain and streamed chat, and
`with_structured_output` by every method (json_schema, function_calling, the default, json_mode).

Not part of CI (LangChain is a large install); run by hand:
    python3 -m venv /tmp/lc && /tmp/lc/bin/pip install langchain-openai
    purehw serve -m smollm2-135m --port 18211 &
    /tmp/lc/bin/python server/tests/langchain_client.py [BASE_URL]
"""
import sys

from typing import Literal, Optional
from pydantic import BaseModel
from langchain_openai import ChatOpenAI

class Pet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird"]
    age: int
    nickname: Optional[str]

class Household(BaseModel):
    owner: str
    pets: list[Pet]

llm = ChatOpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:18211/v1", api_key="x", model="smollm2-135m", temperature=0, max_tokens=300)
print("plain:", llm.invoke("Say hi").content[:80])
print("stream:", "".join(c.content for c in llm.stream("Count to three")) [:80])
for method in ["json_schema", "function_calling", None]:
    kw = {} if method is None else {"method": method}
    r = llm.with_structured_output(Household, **kw).invoke("Describe a household with two pets.")
    assert isinstance(r, Household), r
    print(method, type(r).__name__, r)
# json_mode: the model must follow the instruction itself; just check it parses
r = llm.with_structured_output(None, method="json_mode").invoke("Return a JSON object describing a cat.")
assert isinstance(r, dict), r
print("json_mode", type(r).__name__, str(r)[:200])
