"""counter: a number that calls add to and read.

    call {"op": "add", "n": 2}   -> the new value
    call {"op": "get"}           -> the value
    cast {"op": "add", "n": 1}   (no reply)

args: {"start": 0}. The value survives crashes, restarts and moves like any agent state.
"""

from mesh import Agent, BadRequest


class Counter(Agent):
    read_ops = frozenset({"get"})  # answered without packing the state to compare
    def init(self, args, state):
        return state if state is not None else {"value": int(args.get("start", 0))}

    def handle_call(self, msg, ctx):
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "add":
            self.state["value"] += _amount(msg)
            return self.state["value"]
        if op == "get":
            return self.state["value"]
        if op == "crash":  # for tests and the chaos suite: a handler that fails
            raise RuntimeError("asked to crash")
        raise BadRequest(f"counter: unknown op {op!r} (add, get)")

    def handle_cast(self, msg):
        if isinstance(msg, dict) and msg.get("op") == "add":
            self.state["value"] += _amount(msg)


def _amount(msg) -> int:
    n = msg.get("n", 1)
    if type(n) is not int:
        raise BadRequest("counter: n must be an integer")
    return n
