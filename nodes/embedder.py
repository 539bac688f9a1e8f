"""embedder: embeddings through the node's model client, batched.

    call {"text": "..."}            -> [float, ...]
    call {"texts": ["...", "..."]}  -> [[float, ...], ...]

Calls that arrive while an upstream request is in flight wait in the mailbox and then
go upstream together, up to `max_batch` texts' callers per request: under load, one
HTTP request serves many callers. The agent keeps counters in its state:
{"requests": upstream requests, "texts": texts embedded}.
"""

from mesh import Agent, BadRequest


class EmbeddingAgent(Agent):
    max_batch = 64

    def init(self, args, state):
        return state or {"requests": 0, "texts": 0}

    async def handle_call(self, msg, ctx):
        return (await self.handle_call_batch([msg], [ctx]))[0]

    async def handle_call_batch(self, msgs, ctxs):
        texts, spans, replies = [], [], [None] * len(msgs)
        for i, msg in enumerate(msgs):
            items = _texts(msg)
            if isinstance(items, BadRequest):
                replies[i] = items
                continue
            spans.append((i, len(texts), len(items), "texts" in msg))
            texts += items
        if texts:
            vectors = await self.llm.embed(texts, deadline=min(ctx.deadline for ctx in ctxs))
            self.state["requests"] += 1
            self.state["texts"] += len(texts)
            for i, start, n, many in spans:
                replies[i] = vectors[start:start + n] if many else vectors[start]
        return replies


def _texts(msg):
    if isinstance(msg, dict) and isinstance(msg.get("text"), str):
        return [msg["text"]]
    if isinstance(msg, dict) and isinstance(msg.get("texts"), list) and all(isinstance(t, str) for t in msg["texts"]):
        return msg["texts"]
    return BadRequest("embedder: send {'text': str} or {'texts': [str, ...]}")
