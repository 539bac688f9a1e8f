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
"""

from mesh import Agent, BadRequest

DEFAULT_SYSTEM = "You are a helpful assistant."


class ConversationAgent(Agent):
    def init(self, args, state):
        if state is None:
            state = {"system": args.get("system", DEFAULT_SYSTEM), "history": [], "turns": 0, "dropped": 0}
        self.window = int(args.get("window", 40))
        self.max_chars = int(args.get("max_chars", 32000))
        self.keep = max(int(args.get("keep", 200)), self.window)
        self.params = {"max_tokens": int(args["max_tokens"])} if args.get("max_tokens") else {}
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
        prompt = [{"role": "system", "content": self.state["system"]}] + self._window() + [user]
        result = await self.llm.chat(prompt, deadline=ctx.deadline, on_delta=ctx.stream if ctx.streaming else None,
                                     **self.params)
        history = self.state["history"]
        history += [user, {"role": "assistant", "content": result.text}]
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

    def _window(self) -> list:
        """The newest messages within both limits, starting at a user turn."""
        chosen, chars = [], 0
        for message in reversed(self.state["history"][-self.window:]):
            chars += len(message["content"])
            if chars > self.max_chars:
                break
            chosen.append(message)
        chosen.reverse()
        while chosen and chosen[0]["role"] != "user":
            chosen.pop(0)
        return chosen
