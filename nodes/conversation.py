"""conversation: a chat with a language model whose history survives anything.

    call {"op": "say", "text": "My name is Ada."}  -> {"reply": "...", "turn": 1}
    call {"op": "history"}                         -> [{"role": ..., "content": ...}, ...]
    call {"op": "reset"}                           -> {"cleared": n}   (keeps the system prompt)
    call {"op": "system", "text": "..."}           -> {"system": "..."}

args: {"system": "You are ...", "window": 40, "max_chars": 32000, "max_tokens": N}

An answer the model cut short (at `max_tokens`, or its own limit) is kept, and its
reply says so: {"reply": "...", "turn": n, "finish_reason": "length"}. A reply says
nothing of a finish_reason that is a plain stop.

The history is the agent's durable state: a turn is committed (the user's words and the
model's answer together) before its reply leaves, so it survives kill -9 and moves to
other hosts. A turn whose node dies mid-answer was never committed; its caller's retry
(same request id) runs it once more, never twice.

History window: the model is sent the system prompt plus the newest messages that fit
both `window` (messages) and `max_chars` (characters); older turns stay in the
agent's state up to `keep` messages (default 200), after which the oldest are dropped
in pairs and counted in "dropped". A caller that asked to stream gets the answer
piece by piece as the model produces it; the final reply is the whole answer.
A model failure answers the caller with LLMError and leaves the history unchanged.

Tools: a subclass declares `tools = {"add": {"description": ..., "parameters": {JSON
schema}}}` and a method `tool_add(self, **arguments)` (plain or async) for each. When
the model answers with tool calls, the agent runs them and asks again, until the model
answers with text (at most `max_tool_steps` rounds, args, default 8). Each tool's
result is committed with the turn so far (`checkpoint`) before the next step, under
the call's request id: a crash or a move mid-loop fails the call, and the caller's
retry with the same id resumes the turn, never running a completed tool call again.
A different request abandons an unfinished turn.
"""

import inspect
import json

from mesh import Agent, BadRequest
from mesh.errors import LLMError

DEFAULT_SYSTEM = "You are a helpful assistant."


class ConversationAgent(Agent):
    read_ops = frozenset({"history"})  # answered without packing the state to compare
    tools: dict = {}  # name -> {"description", "parameters"}; run by the method tool_NAME

    def init(self, args, state):
        if state is None:
            state = {"system": args.get("system", DEFAULT_SYSTEM), "history": [], "turns": 0, "dropped": 0}
        self.window = int(args.get("window", 40))
        self.max_chars = int(args.get("max_chars", 32000))
        self.keep = max(int(args.get("keep", 200)), self.window)
        self.params = {"max_tokens": int(args["max_tokens"])} if args.get("max_tokens") else {}
        self.max_tool_steps = int(args.get("max_tool_steps", 8))
        if self.tools:
            self.params["tools"] = [{"type": "function", "function": {"name": name, **spec}}
                                    for name, spec in self.tools.items()]
        return state

    async def handle_call(self, msg, ctx):
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "say":
            return await self._say(msg, ctx)
        if op == "history":
            return self.state["history"]
        if op == "reset":
            cleared = len(self.state["history"])
            self.state["history"] = []
            return {"cleared": cleared}
        if op == "system":
            if not isinstance(msg.get("text"), str):
                raise BadRequest("conversation: system needs a text")
            self.state["system"] = msg["text"]
            return {"system": msg["text"]}
        raise BadRequest(f"conversation: unknown op {op!r} (say, history, reset, system)")

    async def _say(self, msg, ctx):
        text = msg.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("conversation: say needs a non-empty text")
        user = {"role": "user", "content": text}
        pending = self.state.get("pending")
        if pending and pending["rid"] == ctx.request_id and pending["turn"][0] == user:
            turn = pending["turn"]  # a retry of a turn that was under way: resume it
            await self._answer_tools(turn, ctx)
        else:
            turn = [user]
        prompt = [{"role": "system", "content": self.state["system"]}] + self._window()
        for _ in range(self.max_tool_steps + 1):
            result = await self.llm.chat(prompt + turn, deadline=ctx.deadline,
                                         on_delta=ctx.stream if ctx.streaming else None, **self.params)
            if not result.tool_calls or not self.tools:
                break
            turn.append({"role": "assistant", "content": result.text or None, "tool_calls": result.tool_calls})
            await self._answer_tools(turn, ctx)
        else:
            raise LLMError(f"conversation: the model still asked for tools after {self.max_tool_steps} rounds")
        self.state.pop("pending", None)
        history = self.state["history"]
        history += turn + [{"role": "assistant", "content": result.text}]
        self.state["turns"] += 1
        excess = len(history) - self.keep
        if excess > 0:
            excess += excess % 2  # whole turns
            del history[:excess]
            self.state["dropped"] += excess
        reply = {"reply": result.text, "turn": self.state["turns"]}
        if result.finish_reason not in (None, "stop"):
            reply["finish_reason"] = result.finish_reason
        return reply

    async def _answer_tools(self, turn: list, ctx) -> None:
        """Run the tool calls of the turn's last assistant message that have no result yet,
        committing each result with the turn so far before the next (a crash after it
        resumes here, with that call done)."""
        asked = next((m for m in reversed(turn) if m["role"] == "assistant"), None)
        done = {m.get("tool_call_id") for m in turn if m["role"] == "tool"}
        for call in (asked or {}).get("tool_calls") or ():
            if call["id"] in done:
                continue
            turn.append({"role": "tool", "tool_call_id": call["id"], "content": await self._run_tool(call)})
            self.state["pending"] = {"rid": ctx.request_id, "turn": turn}
            await self.checkpoint()

    async def _run_tool(self, call: dict) -> str:
        """The result of one tool call, as the text the model is shown. A tool the agent
        does not have, or arguments that are not a JSON object, are told to the model."""
        name = call["function"]["name"]
        method = getattr(self, f"tool_{name}", None) if name in self.tools else None
        if method is None:
            return f"error: there is no tool {name!r}"
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
            if not isinstance(args, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return f"error: the arguments are not a JSON object ({exc})"
        out = method(**args)
        if inspect.isawaitable(out):
            out = await out
        return out if isinstance(out, str) else json.dumps(out)

    def _window(self) -> list:
        """The newest messages within both limits, starting at a user turn."""
        chosen, chars = [], 0
        for message in reversed(self.state["history"][-self.window:]):
            chars += len(message.get("content") or "")
            if chars > self.max_chars:
                break
            chosen.append(message)
        chosen.reverse()
        while chosen and chosen[0]["role"] != "user":
            chosen.pop(0)
        return chosen
