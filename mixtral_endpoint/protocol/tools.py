"""Tool calling for a tokenizer without tool tokens (Mixtral-8x7B's v1), as TGI serves such models: the
tool definitions go into the prompt as text, the answer is held by a grammar to a JSON array of calls
(or, for `tool_choice: "auto"`, to that or plain text), and the calls are read back out of the text.

The prompt format (the README's "Tool calling" shows it whole): the instructions below are added to the
system message; an assistant turn that called tools is rendered as the array it answered with; `tool`
messages become one user turn that opens with RESULTS_HEADER, one JSON line per result.

Pure: no torch, xgrammar, azureml or mlflow.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

from mixtral_endpoint.protocol.constraints import MAX_SCHEMA_BYTES, Constraint, check_schema, schema_bytes
from mixtral_endpoint.protocol.errors import InvalidRequest

RESULTS_HEADER: Final = "Function results:"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_ARGUMENTS: Final[dict[str, Any]] = {"type": "object", "properties": {}}
MAX_TOOLS: Final = 128  # OpenAI's limit; all of them become one grammar


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # the JSON schema of its arguments


@dataclass(frozen=True)
class ToolUse:
    """The tools of a request whose answer may (auto) or must (required, a named function) be calls."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "required", or the name of the one function to call
    parallel: bool  # parallel_tool_calls: more than one call in an answer

    @property
    def optional(self) -> bool:
        return self.choice == "auto"

    def constraint(self) -> Constraint:
        """A JSON array of calls, each {"name", "arguments"} for one of the tools; or text, for auto."""
        called = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"]} for t in called]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not self.parallel or self.choice not in ("auto", "required"):
            schema["maxItems"] = 1  # a named function is called once, as OpenAI and vLLM do
        return Constraint.json_schema(schema, param="tools", or_text=self.optional)

    def instructions(self) -> str:
        definitions = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                                  for t in self.tools], ensure_ascii=False)
        if self.choice == "auto":
            must = "Call functions only when they help; otherwise answer in plain text."
        elif self.choice == "required":
            must = "You must call at least one function."
        else:
            must = f"You must call the function {self.choice}."
        return (f"You can call these functions; the JSON schema of each one's arguments is its parameters:\n"
                f"{definitions}\n"
                f"To call functions, answer with only a JSON array of calls: "
                f'[{{"name": "<function name>", "arguments": {{<its arguments>}}}}]. {must} '
                f"The results come back in a message that opens with \"{RESULTS_HEADER}\".")


def parse_tool_use(body: dict[str, Any]) -> ToolUse | None:
    """The tools of an OpenAI chat body, checked; None when none may be called (none given, or choice none)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    if tools is not None and len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools has {len(tools)} tools; at most {MAX_TOOLS} are allowed", param="tools")
    offered = tuple(_tool(t, i) for i, t in enumerate(tools or []))
    size = sum(schema_bytes(t.parameters) for t in offered)
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"the tools' parameters are {size} bytes as JSON together; at most {MAX_SCHEMA_BYTES} "
                             "are allowed", param="tools")
    names = [t.name for t in offered]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequest(f"two tools are named '{name}'", param=f"tools[{i}].function.name")
    chosen = _choice(choice, names)
    if chosen == "none" or (not offered and chosen == "auto"):
        return None
    return ToolUse(offered, chosen, parallel is not False)


def _tool(tool: Any, i: int) -> Tool:
    path = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidRequest(f"{path} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                             "\"parameters\"}}", param=path)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"{path}.function.name must be 1 to 64 letters, digits, _ or -",
                             param=f"{path}.function.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(f"{path}.function.description must be a string", param=f"{path}.function.description")
    parameters = function.get("parameters") or _NO_ARGUMENTS
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{path}.function.parameters must be a JSON schema object",
                             param=f"{path}.function.parameters")
    check_schema(parameters, f"{path}.function.parameters")
    return Tool(name, description, parameters)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise InvalidRequest("tool_choice is required, but the request has no tools", param="tool_choice")
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param="tool_choice")
    if name not in names:
        offered = ", ".join(names) or "none given"
        raise InvalidRequest(f"tool_choice names a function that is not among the tools ({offered})",
                             param="tool_choice.function.name")  # what was sent is not echoed
    return name


def calls_text(tool_calls: Any, path: str) -> tuple[str, dict[str, str]]:
    """An assistant message's tool_calls as the array the model answers with, and each call id's function."""
    if not isinstance(tool_calls, list):
        raise InvalidRequest(f"{path} must be a list of calls", param=path)
    calls, names = [], {}
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{path}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                 "\"arguments\"}}}}", param=f"{path}[{j}]")
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidRequest(f"{path}[{j}].function.arguments must be a JSON object, as a string",
                                 param=f"{path}[{j}].function.arguments")
        calls.append({"name": function["name"], "arguments": parsed})
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
    return json.dumps(calls, ensure_ascii=False), names


def result_line(call_id: Any, name: str | None, content: str) -> str:
    """One `tool` message as a line of the results turn."""
    return json.dumps({"call_id": call_id, "name": name, "content": content}, ensure_ascii=False)


def read_calls(text: str, tool_use: ToolUse) -> list[dict[str, Any]] | None:
    """OpenAI's tool_calls from an answer, or None when it is text (or calls cut short by max_tokens)."""
    if not text.startswith("["):
        return None
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    names = {t.name for t in tool_use.tools}
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments"), dict) for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
