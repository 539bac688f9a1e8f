"""Process groups (OTP's pg, Nx.Serving's partitions): N agents under one group name.

A group's members are ordinary agents named GROUP.0 .. GROUP.N-1, spawned with the
group's name in their spec, so the supervisor places them on distinct nodes while there
are enough (and keeps them spread when they restart or move) and lists them on request
(a STATUS view answered from its records, nothing asked of the nodes).

A call to the group goes to the member this caller has the fewest calls in flight to
(ties broken at random, so many callers spread too). When a member cannot take it, the
call goes to another member at once instead of waiting for that one to come back:

    answered AgentDown, Unavailable,   -> the member never ran it: next member
      Busy, NoSuchAgent; or its node's
      link was down, or did not come up
      within CONNECT_S, before sending
    the link went down after sending   -> it may have run: next member only if the caller
      (the member's node died)            said the call is idempotent, else LinkDown
    every member tried                 -> Busy if each was busy; else wait (with backoff)
                                          for members to come back, until the deadline

Each attempt is a call to one member with its own request id, so G2 holds per member;
what is not promised is that a non-idempotent call that may have run on a member that
died is not run again by another (hence the rule above).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .clock import Backoff
from .errors import AgentDown, Busy, CallError, CallTimeout, LinkDown, NoSuchAgent, NotAllowed, Unavailable
from .wire import Kind

if TYPE_CHECKING:
    from .client import Client

MEMBERS_TTL_S = 5.0   # a group's member list is asked again after this long
DOWN_FOR_S = 1.0      # a member that could not take a call is passed over this long
CONNECT_S = 0.5       # how long a first connection to a member's node may take


def member_name(group: str, i: int) -> str:
    return f"{group}.{i}"


class Groups:
    """One client's view of the groups it calls: members, and its calls in flight to each."""

    def __init__(self, client: "Client"):
        self.client, self.clock = client, client.clock
        self._members: dict[str, tuple[float, list[str]]] = {}  # group -> (when asked, names)
        self.in_flight: dict[str, int] = {}                      # member -> this caller's calls
        self._down_until: dict[str, float] = {}                  # member -> passed over until

    async def spawn(self, group: str, kind: str, size: int, args: dict | None, restart: str,
                    supervisor: str | None, timeout: float | None) -> list[dict]:
        """Spawn the members GROUP.0 .. GROUP.size-1 that do not exist yet; returns every
        member as {name, node, incarnation} (those already there as they are)."""
        if not 1 <= size <= 1000:
            raise ValueError(f"a group has 1..1000 members, not {size}")
        have = {m["name"]: m for m in await self.members(group, timeout)}
        out = []
        for i in range(size):
            name = member_name(group, i)
            if name in have:
                out.append({"name": name, "node": have[name]["node"], "incarnation": have[name]["incarnation"]})
                continue
            body = {"name": name, "kind": kind, "args": args or {}, "restart": restart, "group": group}
            if supervisor:
                body["supervisor"] = supervisor
            placed = await self.client._control(Kind.SPAWN, None, body, timeout)
            self.client.resolver.learn(name, placed["node"], placed["incarnation"])
            out.append({"name": name, "node": placed["node"], "incarnation": placed["incarnation"]})
        self._members.pop(group, None)
        return out

    async def members(self, group: str, timeout: float | None = None) -> list[dict]:
        """The group's members as the supervisor knows them: {name, kind, status, node,
        incarnation, restarts}; what runs is learnt as where to call."""
        answer = await self.client._control(Kind.STATUS, None, {"group": group}, timeout)
        if "members" not in answer:  # it listed every agent: a release before groups
            raise NotAllowed("the supervisor runs a release without process groups: upgrade it first")
        members = answer["members"]
        for m in members:
            if m["node"]:
                self.client.resolver.learn(m["name"], m["node"], m["incarnation"])
        self._members[group] = (self.clock.now(), [m["name"] for m in members])
        return members

    async def _names(self, group: str, deadline: float) -> list[str]:
        known = self._members.get(group)
        if known is not None and self.clock.now() - known[0] < MEMBERS_TTL_S:
            return known[1]
        try:
            await self.members(group, max(0.05, deadline - self.clock.now()))
        except CallError:
            if known is None:
                raise
            self._members[group] = (self.clock.now(), known[1])  # the supervisor is away: keep calling these
        return self._members[group][1]

    def _pick(self, names: list[str], tried: set[str]) -> str | None:
        now = self.clock.now()
        fresh = [n for n in names if n not in tried]
        ready = [n for n in fresh if self._down_until.get(n, 0.0) <= now] or fresh
        if not ready:
            return None
        least = min(self.in_flight.get(n, 0) for n in ready)
        return random.choice([n for n in ready if self.in_flight.get(n, 0) == least])

    async def call(self, group: str, msg: Any, timeout: float, idempotent: bool = False) -> Any:
        deadline = self.clock.now() + timeout
        tried: set[str] = set()
        busy: list[Busy] = []
        last: CallError | None = None
        backoff = Backoff(self.clock)
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise CallTimeout(f"call to group {group!r} got no reply within {timeout:.3g}s"
                                  + (f" (last: {last})" if last else ""))
            names = await self._names(group, deadline)
            if not names:
                raise NoSuchAgent(f"group {group!r} has no members")
            member = self._pick(names, tried)
            if member is None:  # each member was tried once
                if len(busy) == len(tried):
                    raise Busy(f"every member of group {group!r} is busy: {busy[-1]}")
                tried.clear()
                busy.clear()
                self._members.pop(group, None)  # ask who the members are, and where, again
                await backoff.wait(deadline - 0.05)
                continue
            tried.add(member)
            where = self.client.resolver.where(member)
            if where and where[0] and not await self.client.connected(where[0], min(CONNECT_S, remaining)):
                # Never connected, and it does not answer: nothing was sent, so nothing
                # waits on a link to be delivered there later (and run twice).
                self._down_until[member] = self.clock.now() + DOWN_FOR_S
                last = LinkDown(f"no connection to node {where[0]}", {"unsent": True})
                continue
            self.in_flight[member] = self.in_flight.get(member, 0) + 1
            try:
                return await self.client.caller.call(member, msg, remaining, follow=False)
            except Busy as err:
                busy.append(err)
                last = err
            except LinkDown as err:
                if not (idempotent or err.data.get("unsent")):
                    raise  # it may have run there; run again elsewhere only if that is harmless
                self._down_until[member] = self.clock.now() + DOWN_FOR_S
                last = err
            except (AgentDown, Unavailable) as err:
                self._down_until[member] = self.clock.now() + DOWN_FOR_S
                last = err
            except NoSuchAgent as err:  # stopped: the member list is out of date
                self._members.pop(group, None)
                last = err
            finally:
                left = self.in_flight[member] - 1
                if left:
                    self.in_flight[member] = left
                else:
                    del self.in_flight[member]

    async def stop(self, group: str, timeout: float | None) -> list[str]:
        """Stop every member; returns their names."""
        names = [m["name"] for m in await self.members(group, timeout)]
        for name in names:
            try:
                await self.client.stop(name, timeout)
            except NoSuchAgent:
                pass  # stopped meanwhile
        self._members.pop(group, None)
        return names
