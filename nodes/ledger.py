"""ledger: an append-only list of values.

    call {"op": "append", "value": V}   -> the index V was stored at
    call {"op": "read"}                 -> every value, in order
    call {"op": "len"}                  -> how many values
    call {"op": "crash"}                -> raises (AgentCrashed): for tests and the chaos suite

Each append is committed before its index is returned, so an acknowledged append is
never lost; a repeated request id returns the same index without appending twice.
"""

from mesh import Agent, BadRequest


class Ledger(Agent):
    read_ops = frozenset({"read", "len"})  # answered without packing the state to compare
    def init(self, args, state):
        return state if state is not None else {"values": []}

    def handle_call(self, msg, ctx):
        op = msg.get("op") if isinstance(msg, dict) else None
        values = self.state["values"]
        if op == "append":
            if "value" not in msg:
                raise BadRequest("ledger: append needs a value")
            values.append(msg["value"])
            return len(values) - 1
        if op == "read":
            return values
        if op == "len":
            return len(values)
        if op == "crash":  # for tests and the chaos suite: a handler that fails
            raise RuntimeError("asked to crash")
        raise BadRequest(f"ledger: unknown op {op!r} (append, read, len)")
