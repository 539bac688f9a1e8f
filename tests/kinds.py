"""Agent kinds used only by the tests (allowed by the test configs as kinds:Name)."""

import asyncio
import os
import threading
import time

from mesh import Agent, BadRequest
from mesh.serving import Serving
from nodes.conversation import ConversationAgent

# In-process tests release waiting handlers through these events, by key.
GATES: dict[str, asyncio.Event] = {}
RUNS: dict[str, int] = {}


class Waiter(Agent):
    """async handler: {"op": "wait", "key": k} blocks until GATES[k] is set; counts runs."""

    async def handle_call(self, msg, ctx):
        op = msg.get("op")
        if op == "wait":
            key = msg["key"]
            RUNS[key] = RUNS.get(key, 0) + 1
            self.state = (self.state or 0) + 1
            await GATES.setdefault(key, asyncio.Event()).wait()
            return f"released {key}"
        if op == "sleep":
            await asyncio.sleep(msg["seconds"])
            return "slept"
        if op == "slow_add":  # a change that takes a while: the state counts the runs
            await asyncio.sleep(msg["seconds"])
            self.state = (self.state or 0) + 1
            return self.state
        if op == "forever":
            await asyncio.Event().wait()
        if op == "get":
            return self.state
        if op == "name":
            return self.name
        if op == "log":
            self.log.warning("asked to log: %s", msg.get("text"))
            return "logged"
        raise BadRequest(f"unknown op {op!r}")


class Relay(Agent):
    """Calls another agent from inside its handler; optionally crashes afterwards."""

    async def handle_call(self, msg, ctx):
        reply = await self.call(msg["to"], msg["msg"])
        self.state = (self.state or 0) + 1
        if msg.get("then_crash"):
            raise RuntimeError("crash after the relayed call")
        return reply

    def handle_cast(self, msg):
        self.cast(msg["to"], msg["msg"])


class Lifecycle(Agent):
    """Stops itself, arms timers, records what happened to it in its state."""

    def init(self, args, state):
        state = state or {"events": []}
        state["events"].append("init")
        return state

    def handle_call(self, msg, ctx):
        op = msg["op"]
        if op == "stop":
            self.stop(msg.get("reason", "normal"))
            return "stopping"
        if op == "tick_after":
            self.send_after(msg["seconds"], {"tick": msg.get("n", 1)})
            return "armed"
        if op == "events":
            return self.state["events"]
        if op == "bad_state":
            self.state["events"].append(object())
            return "never"
        if op == "bad_reply":
            return object()
        raise BadRequest(op)

    def handle_info(self, msg):
        self.state["events"].append(f"tick {msg['tick']}")

    def terminate(self, reason):
        self.state["events"].append(f"terminate {reason}")


class FailsInit(Agent):
    def init(self, args, state):
        raise ValueError("init refuses")


class NotAnAgent:
    pass


class Whoami(Agent):
    """Answers with who the mesh says called it, and who the caller said it was."""

    def handle_call(self, msg, ctx):
        return {"sender": ctx.sender, "claimed": ctx.claimed_sender}


class Spawner(Agent):
    """Spawns other agents from inside a handler: {"name", "kind", "supervisor"?}."""

    async def handle_call(self, msg, ctx):
        return await self.spawn(msg["name"], msg["kind"], supervisor=msg.get("supervisor"))


BROKEN: set[str] = set()   # names whose init fails while listed
STARTS: dict[str, int] = {}


class Flaky(Agent):
    """A counter whose init fails while its name is in BROKEN; counts its starts."""

    def init(self, args, state):
        STARTS[self.name] = STARTS.get(self.name, 0) + 1
        if self.name in BROKEN:
            raise RuntimeError("init refuses while broken")
        return state or {"value": 0}

    def handle_call(self, msg, ctx):
        if msg.get("op") == "crash":
            raise RuntimeError("asked to crash")
        return self.state["value"]


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:  # one short write with O_APPEND: whole lines across processes
        f.write(line + "\n")


class Recorder(Agent):
    """Notes its init (which takes args["init_s"]) and terminate in the file args["path"]."""

    def init(self, args, state):
        self._path = args["path"]
        _note(self._path, f"begin {self.name}")
        time.sleep(args.get("init_s", 0))
        _note(self._path, f"end {self.name}")
        return state or {}

    def handle_call(self, msg, ctx):
        return self.name

    def terminate(self, reason):
        _note(self._path, f"terminate {self.name} {reason}")


class Stamper(Agent):
    """Appends a fresh random token to the ledger msg["to"]; crashes after the append on
    its first run per key (RUNS), so that a retry runs the handler again."""

    async def handle_call(self, msg, ctx):
        import os
        index = await self.call(msg["to"], {"op": "append", "value": os.urandom(4).hex()})
        key = f"stamp:{ctx.request_id}"
        RUNS[key] = RUNS.get(key, 0) + 1
        if RUNS[key] == 1:
            raise RuntimeError("crash after the nested call")
        return index


class IntKeys(Agent):
    """A state whose map has an integer key, as a handler may well build."""

    def init(self, args, state):
        return state if state is not None else {1: "one"}


# Serving tests hold the worker thread on these (threading, not asyncio: it is another thread).
HOLD: dict[str, threading.Event] = {}
ENTERED: dict[str, threading.Event] = {}  # set when a batch holding on k has begun
BATCHES: list[list] = []   # every batch predict_batch ran, in order
LOADS: list[str] = []      # every load, by agent name
NICES: dict[str, int] = {}  # the nice value of each agent's worker thread, read by its load


class Doubler(Serving):
    """A model that doubles numbers. args {"hold_load": k} makes load wait for HOLD[k]; an
    input "hold:k" makes its batch wait for HOLD[k]; an input "boom" raises."""

    def load(self, args):
        NICES[self.name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if args.get("hold_load"):
            HOLD.setdefault(args["hold_load"], threading.Event()).wait(30)
        LOADS.append(self.name)

    def predict_batch(self, inputs):
        BATCHES.append(list(inputs))
        for x in inputs:
            if isinstance(x, str) and x.startswith("hold:"):
                ENTERED.setdefault(x[5:], threading.Event()).set()
                HOLD.setdefault(x[5:], threading.Event()).wait(30)
        if "boom" in inputs:
            raise ValueError("the model cannot take 'boom'")
        return [x * 2 if isinstance(x, (int, float)) else x for x in inputs]


class Calculator(ConversationAgent):
    """A conversation with one tool, add(a, b), which counts its runs in the state. With
    args {"crash_after_tool": true}, the first tool step crashes the agent right after its
    checkpoint (once: the crash is marked in the checkpointed state)."""

    tools = {"add": {"description": "adds two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}

    def init(self, args, state):
        state = super().init(args, state)
        state.setdefault("adds", 0)
        self.crash_after_tool = bool(args.get("crash_after_tool"))
        self._crash_next = False
        return state

    async def handle_call(self, msg, ctx):
        if msg.get("op") == "adds":
            return self.state["adds"]
        return await super().handle_call(msg, ctx)

    def tool_add(self, a, b):
        self.state["adds"] += 1
        if self.crash_after_tool and not self.state.get("crashed"):
            self.state["crashed"] = self._crash_next = True
        return a + b

    async def checkpoint(self):
        await super().checkpoint()
        if self._crash_next:
            self._crash_next = False
            raise RuntimeError("crashed after the tool step's checkpoint")


class Stepper(Agent):
    """{"op": "step"} adds 1, checkpoints, then (with "crash") raises; counts finished steps
    in RUNS["steps"]. {"op": "get"} reads the state."""

    async def handle_call(self, msg, ctx):
        if msg["op"] == "step":
            self.state = (self.state or 0) + 1
            await self.checkpoint()
            if msg.get("crash"):
                raise RuntimeError("crashed after the checkpoint")
            RUNS["steps"] = RUNS.get("steps", 0) + 1
            return self.state
        return self.state


class Peeker(Agent):
    """Declares `peek`, `sneak` and `tell` read-only; `sneak` breaks that promise (for
    MESH_CHECK_READS); `add` (call or cast) is an ordinary change."""

    read_ops = frozenset({"peek", "sneak", "tell"})

    def init(self, args, state):
        return state if state is not None else {"n": 0, "pad": b"x" * int(args.get("pad", 0))}

    def handle_call(self, msg, ctx):
        if msg["op"] == "add":
            self.state["n"] += 1
        elif msg["op"] == "sneak":
            self.state["n"] += 100
        elif msg["op"] == "tell":  # a read that casts: its cast waits for a commit all the same
            self.cast(msg["to"], {"op": "add"})
        return self.state["n"]

    def handle_cast(self, msg):
        self.state["n"] += 1
