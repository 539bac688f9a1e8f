"""The `mesh` command. Each verb builds one request, sends it, prints the answer.

Exit codes: 0 success; 1 the mesh answered with an error (stderr names it); 2 bad usage
(including a config file that does not load).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from typing import Any

import click

from . import config as config_mod
from .errors import CallError, ConfigError
from .supervision import ChildStatus

CONFIG_HELP = "cluster config file (default: $MESH_CONFIG, then configs/local.toml)"
TROUBLESHOOTING = "docs/troubleshooting.md"


def _see(anchor: str) -> str:
    """Where the troubleshooting page explains an error: its cause, the command that shows more."""
    return f"(see {TROUBLESHOOTING}#{anchor.lower()})"


def _usage_exit(message: str) -> None:
    """A user's mistake (a config, a key file): one line on stderr naming it, exit 2."""
    click.echo(f"mesh: {message}", err=True)
    sys.exit(2)


def _load(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        _usage_exit(f"config error: {exc} {_see('config-errors')}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None


def _to_json(value: Any) -> str:
    """JSON as the standard defines it: bytes as {"$bytes": base64}; NaN and the
    infinities, which JSON cannot carry, as the strings "NaN", "Infinity", "-Infinity"
    (said on stderr), never as the bare words Python's json would print."""
    def default(obj):
        if isinstance(obj, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(obj).decode()}
        return repr(obj)
    try:
        return json.dumps(value, default=default, ensure_ascii=False, allow_nan=False)
    except ValueError:
        click.echo("mesh: the answer holds NaN or Infinity, printed as strings", err=True)
        return json.dumps(_finite(value), default=default, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _run(coro_fn, cfg: config_mod.Config):
    """Run one client request; a mesh error exits 1 with its name on stderr."""
    from .client import Client
    key = click.get_current_context().params.get("key")
    try:
        client = Client(cfg, key=key)
    except ConfigError as exc:
        _usage_exit(f"key error: {exc} {_see('key-errors')}")

    async def go():
        async with client:
            return await coro_fn(client)
    import asyncio  # here, not above: the quick path (mesh.quick) does without it
    try:
        return asyncio.run(go())
    except CallError as err:
        _call_error(err)


def _call_error(err: CallError) -> None:
    name = type(err).__name__
    click.echo(f"mesh: {name}: {err} {_see(name)}", err=True)
    sys.exit(1)


def _quick(quick_fn, full_fn, cfg: config_mod.Config):
    """One command's requests on the quick path (mesh.quick: no asyncio), handed to the
    full client when they need waiting, following or retrying."""
    from .quick import Handoff, QuickClient
    key = click.get_current_context().params.get("key")
    try:
        q = QuickClient(cfg, key=key)
    except ConfigError as exc:
        _usage_exit(f"key error: {exc} {_see('key-errors')}")
    try:
        with q:
            return quick_fn(q)
    except Handoff:
        return _run(full_fn, cfg)
    except CallError as err:
        _call_error(err)


def _preflight(cfg: config_mod.Config, nodes: list[str]) -> None:
    """Check what a node needs before forking it: its key file, when the cluster is secure."""
    if not cfg.secure:
        return
    from .security import node_keypair
    for node in nodes:
        try:
            node_keypair(cfg, node)
        except ConfigError as exc:
            raise click.UsageError(f"key error: {exc} {_see('key-errors')}") from None


def config_option(fn):
    fn = click.option("-k", "--key", default=None, envvar="MESH_KEY", show_envvar=True,
                      help="secret key file to connect with, when the cluster is secure")(fn)
    return click.option("-c", "--config", "config_path", default=None, help=CONFIG_HELP)(fn)


def config_only(fn):
    return click.option("-c", "--config", "config_path", default=None, help=CONFIG_HELP)(fn)


@click.group()
@click.version_option(package_name="mesh")
def main() -> None:
    """Long-lived, stateful agents on ZeroMQ, supervised the OTP way."""


restarts_option = click.option("--max-restarts", type=click.IntRange(0, 1000), default=None,
                               help="restarts of a node within [launcher] period_s before giving up (overrides the config)")


@main.command(epilog="""Example: mesh up -c configs/local.toml""")
@config_only
@click.option("--host", default=None, help="the host of a multi-host config whose nodes to start")
@restarts_option
def up(config_path, host, max_restarts):
    """Start every node of CONFIG on this host; foreground; Ctrl-C or SIGTERM stops all."""
    from .launcher import Launcher, host_nodes
    from .serve import configure_logging
    cfg = _load(config_path)
    try:
        nodes = host_nodes(cfg, host)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _preflight(cfg, nodes)
    _kinds_from_cwd()
    configure_logging()
    click.echo(f"starting {', '.join(nodes)} from {cfg.path}")
    sys.exit(Launcher(_with_restarts(cfg, max_restarts), nodes, say=lambda line: click.echo(line)).run())


@main.command(epilog="""Example: mesh node -c configs/local.toml n2""")
@config_only
@click.argument("node")
@restarts_option
def node(config_path, node, max_restarts):
    """Start one node under its launcher (restarted at once if it dies)."""
    from .launcher import Launcher
    from .serve import configure_logging
    cfg = _load(config_path)
    if node not in cfg.nodes:
        raise click.UsageError(f"no node named {node!r} in {cfg.path} (nodes: {', '.join(cfg.nodes)})")
    _preflight(cfg, [node])
    _kinds_from_cwd()
    configure_logging()
    sys.exit(Launcher(_with_restarts(cfg, max_restarts), [node], say=lambda line: click.echo(line)).run())


def _kinds_from_cwd() -> None:
    """Kinds are imported with the current folder on the path, as `python -m` would, so a
    kind in ./greeter.py is allowed as "greeter:Greeter" (uvicorn and celery do the same)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _with_restarts(cfg: config_mod.Config, max_restarts: int | None) -> config_mod.Config:
    import dataclasses
    if max_restarts is None:
        return cfg
    return dataclasses.replace(cfg, launcher=dataclasses.replace(cfg.launcher, max_restarts=max_restarts))


@main.command(epilog="""Example: mesh spawn c1 counter""")
@config_option
@click.argument("name")
@click.argument("kind")
@click.option("--args", "args_json", default="{}", help="JSON object passed to the agent's init")
@click.option("--restart", type=click.Choice(["permanent", "transient", "temporary"]), default="permanent")
@click.option("--supervisor", default=None, help="the dynamic supervisor to start it under (default: [supervisor] dynamic)")
@click.option("--members", type=click.IntRange(1, 1000), default=None,
              help="start a process group NAME of this many members, NAME.0 .. NAME.N-1, on distinct nodes")
def spawn(config_path, key, name, kind, args_json, restart, supervisor, members):
    """Start agent NAME of KIND under a dynamic supervisor (or, with --members, a group
    of agents called as one: `mesh call --group NAME ...`)."""
    args = _json_arg(args_json, "--args")
    if not isinstance(args, dict):
        raise click.BadParameter("--args must be a JSON object")
    cfg = _load(config_path)
    if cfg.resolve_kind(kind) is None:
        allowed = ", ".join(sorted(cfg.kinds)) or "none"
        click.echo(f"mesh: NotAllowed: kind {kind!r} is not in the config's allow-list ({allowed}) {_see('NotAllowed')}",
                   err=True)
        sys.exit(1)
    if members is not None:
        result = _run(lambda c: c.spawn_group(name, kind, members, args, restart, supervisor=supervisor), cfg)
    else:
        result = _run(lambda c: c.spawn(name, kind, args, restart, supervisor), cfg)
    click.echo(_to_json(result))


@main.command(epilog="""Example: mesh call c1 '{"op": "add", "n": 1}' --request-id add-1""")
@config_option
@click.argument("name")
@click.argument("message")
@click.option("--timeout", type=float, default=None, help="seconds to wait for the reply")
@click.option("--request-id", default=None, help="make the call idempotent: a repeat returns the recorded reply")
@click.option("--group", is_flag=True, help="NAME is a process group: call its least loaded member")
@click.option("--idempotent", is_flag=True,
              help="with --group: the call may run again on another member if the one that had it dies")
def call(config_path, key, name, message, timeout, request_id, group, idempotent):
    """Call agent NAME with the JSON MESSAGE; prints the reply as JSON."""
    msg = _json_arg(message, "MESSAGE")
    if request_id is not None and not (0 < len(request_id) <= 128):
        raise click.BadParameter("--request-id must be 1..128 characters")
    if group and request_id is not None:
        raise click.BadParameter("--request-id names a call to one agent; a group call has one per member tried")
    cfg = _load(config_path)
    if group:
        click.echo(_to_json(_run(lambda c: c.call_group(name, msg, timeout, idempotent), cfg)))
        return
    timeout = cfg.timing.call_timeout_s if timeout is None else timeout
    rid = request_id or base64.b32encode(os.urandom(10)).decode().lower()  # kept if the full client takes over
    started = time.monotonic()
    click.echo(_to_json(_quick(lambda q: q.call(name, msg, timeout, rid),
                               lambda c: c.call(name, msg, max(0.1, timeout - (time.monotonic() - started)), rid),
                               cfg)))


@main.command(epilog="""Example: mesh cast c1 '{"op": "add", "n": 1}'""")
@config_option
@click.argument("name")
@click.argument("message")
def cast(config_path, key, name, message):
    """Send the JSON MESSAGE to agent NAME without waiting for an answer."""
    msg = _json_arg(message, "MESSAGE")
    cfg = _load(config_path)

    async def do(c):
        await c.whereis(name)  # fails fast with NoSuchAgent for an unknown name
        await c.cast(name, msg)
    _run(do, cfg)


@main.command(epilog="""Example: mesh stop user-42""")
@config_option
@click.argument("name")
def stop(config_path, key, name):
    """Stop agent NAME and forget its state."""
    cfg = _load(config_path)
    click.echo(_to_json(_run(lambda c: c.stop(name), cfg)))


STATUS_LISTS_UP_TO = 200  # agents `mesh status` lists unasked; past that, counts (--agents lists)


@main.command(epilog="""Example: mesh status --agents --status backoff --limit 50""")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@click.option("--agents", "list_agents", is_flag=True,
              help=f"list agents even past {STATUS_LISTS_UP_TO} (a page of --limit, default 1000)")
@click.option("--kind", default=None, help="list only agents of this kind")
@click.option("--node", default=None, help="list only agents running on this node")
@click.option("--status", "status_", default=None,
              type=click.Choice([s.value for s in ChildStatus]),
              help="list only agents in this state")
@click.option("--limit", type=click.IntRange(1, 10_000), default=None, help="agents per page (default 1000)")
@click.option("--after", default=None, help="the page after this agent name (a page's last line says it)")
def status(config_path, key, as_json, list_agents, kind, node, status_, limit, after):
    """Nodes (name, address, alive, agents) and agents (name, kind, node, incarnation, code
    version, restarts, mailbox); past 200 agents, counts by kind and state unless --agents
    or a filter asks for a list."""
    cfg = _load(config_path)
    view = {k: v for k, v in (("kind", kind), ("node", node), ("status", status_), ("after", after)) if v is not None}

    async def ask(c):
        if list_agents or view or limit:
            return await c.status(agents=True, limit=limit or 1000, **view)
        st = await c.status(agents=False)
        if "agents" in st or st["total"] > STATUS_LISTS_UP_TO:  # a supervisor of the release before lists all
            return st
        return await c.status()

    def ask_quick(q):
        wait = cfg.timing.call_timeout_s
        if list_agents or view or limit:
            return q.status({"agents": True, "limit": limit or 1000, **view}, wait)
        st = q.status({"agents": False}, wait)
        if "agents" in st or st["total"] > STATUS_LISTS_UP_TO:
            return st
        return q.status({"agents": True, "limit": STATUS_LISTS_UP_TO}, wait)
    st = _quick(ask_quick, ask, cfg)
    if as_json:
        click.echo(_to_json(st))
        return
    click.echo(_table(["NODE", "ADDRESS", "ALIVE", "PID", "AGENTS", ""],
                      [[n["name"], n["address"], "yes" if n["alive"] else "no", n["pid"] or "-",
                        n["agents"], ", ".join(w for w, on in (("supervisor", n["supervisor"]),
                                                               ("disk full", n.get("store_full")),
                                                               ("draining", n.get("draining"))) if on)]
                       for n in st["nodes"]]))
    click.echo()
    if "agents" not in st:
        click.echo(_table(["KIND", "AGENTS"], [[k, n] for k, n in sorted(st["kinds"].items())]))
        click.echo()
        click.echo(_table(["STATUS", "AGENTS"], [[s, n] for s, n in sorted(st["statuses"].items())]))
        click.echo(f"\n{st['total']:,} agents: list them with --agents (and --kind, --node, --status, --limit)")
    else:
        click.echo(_table(["AGENT", "KIND", "NODE", "INCARNATION", "VSN", "RESTARTS", "MAILBOX", "STATUS"],
                          [[a["name"], a["kind"], a["node"] or "-", a["incarnation"], a.get("vsn") or "-",
                            a["restarts"], a["mailbox"], _agent_status(a)] for a in st["agents"]]))
        if st.get("next"):
            click.echo(f"\nmore: mesh status --agents --after {st['next']} (same filters)")
    if st.get("failed"):
        click.echo(f"\nTHE TREE FAILED: {st.get('failure') or 'the root supervisor gave up'}")


@main.command(epilog="""Example: mesh inspect user-42 --max-bytes 10000""")
@config_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of lines")
@click.option("--max-bytes", type=click.IntRange(100, 1_000_000), default=2000, show_default=True,
              help="show at most this much of the state (and a quarter of it per message)")
def inspect(config_path, key, name, as_json, max_bytes):
    """Agent NAME as its node and supervisor see it: kind, code version, node, incarnation,
    state, mailbox and its first waiting messages, the message in hand and for how long,
    commits, recorded replies, restarts and latest exits."""
    cfg = _load(config_path)
    seen = _run(lambda c: c.inspect(name, max_bytes), cfg)
    if as_json:
        click.echo(_to_json(seen))
        return
    sup = seen["supervision"]
    lines = [("agent", f"{seen['name']} ({sup['kind']}, version {seen.get('vsn') or sup.get('vsn') or '-'})"),
             ("node", f"{seen['node'] or '-'}, incarnation {sup['incarnation']}, {sup['status']}"
                      f"{', paused' if seen.get('paused') else ''}"),
             ("restarts", f"{sup['restarts']}" + "".join(f"\n  {_when(t)} {why}" for t, why in sup.get("exits", ())))]
    if seen["node"]:
        lines += [("state", seen["state"]),
                  ("mailbox", f"{seen['mailbox']}" + "".join(
                      f"\n  {m['kind']} {m['id'] or ''} waited {m['waited_ms']} ms: {m['body']}" for m in seen["waiting"])),
                  ("handling", "nothing" if seen["handling_for_ms"] is None else
                   f"for {seen['handling_for_ms']:,.0f} ms:" + "".join(
                       f"\n  {m['kind']} {m['id'] or ''}: {m['body']}" for m in seen["handling"])),
                  ("handled", f"{seen['handled']:,} messages; state seq {seen['seq']}, committed "
                              f"{seen['committed_seq'] if seen['committed_seq'] is not None else '-'}"),
                  ("replies kept", f"{seen['replies_kept']:,}"),
                  ("replicas", ", ".join(seen["replicas"]) or "none")]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")


def _when(t: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@main.command(epilog="Example: mesh trace user-42 --for 30")
@config_option
@click.argument("name")
@click.option("--for", "seconds", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="seconds to trace, then stop")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event instead of lines")
@click.option("--max-body", type=click.IntRange(0, 10_000), default=200, show_default=True,
              help="show at most this much of each message body")
def trace(config_path, key, name, seconds, as_json, max_body):
    """Stream what happens to agent NAME as it happens: messages in (call, cast, info),
    their handling, replies and errors out with their times and sizes, state commits,
    the calls and casts it makes, crashes, exits and restarts (OTP's sys:trace)."""
    cfg = _load(config_path)

    def show(event: dict) -> None:
        if as_json:
            click.echo(_to_json(event))
            return
        import datetime
        t = datetime.datetime.fromtimestamp(event.get("t") or 0, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ev", "t", "body") and v is not None)
        body = f"  {event['body']}" if "body" in event else ""
        click.echo(f"{t}  {event['ev']:<9} {rest}{body}")
    summaries = _run(lambda c: c.trace(name, seconds, show, max_body), cfg)
    last = summaries[-1] if summaries else {"ended": "not placed again"}
    events, dropped = sum(s.get("events", 0) for s in summaries), sum(s.get("dropped", 0) for s in summaries)
    show({"ev": "end", "t": time.time(), "ended": last.get("ended"), "events": events, "dropped": dropped})


@main.command(epilog="Example: mesh top   (or: mesh top --plain > snapshot.txt)")
@config_option
@click.option("--plain", is_flag=True, help="print two samples a second apart as plain tables, and exit")
def top(config_path, key, plain):
    """A live view of the nodes (up, agents, messages/s, commit groups/s, their size and
    time, memory) and the busiest agents (mailbox, messages/s, time in the message in
    hand, restarts), refreshed every second. Keys: s sorts, up/down selects, enter
    inspects, q quits. Plain tables when stdout is not a terminal."""
    from . import top as top_mod
    cfg = _load(config_path)
    if plain or not sys.stdout.isatty() or not sys.stdin.isatty():
        click.echo(_run(lambda c: top_mod.plain(c, _table), cfg))
        return
    import importlib.util
    if importlib.util.find_spec("rich") is None:
        _usage_exit("mesh top's live view needs rich: pip install -e '.[top]' (or mesh top --plain)")
    _run(top_mod.live, cfg)


@main.command(epilog="""Example: mesh upgrade counter --to nodes.counter:Counter""")
@config_option
@click.argument("kind")
@click.option("--to", "to", default=None, help="MODULE:CLASS to run KIND from now on (default: KIND's module, read again)")
@click.option("--extra", "extra_json", default=None, help="JSON value passed to code_change")
@click.option("--rollback", is_flag=True, help="return KIND's agents to the code they ran before the last upgrade")
def upgrade(config_path, key, kind, to, extra_json, rollback):
    """Load KIND's new code on every node, one node at a time, and migrate its agents
    between two messages (code_change); prints one JSON object, exits 1 unless all migrated."""
    extra = _json_arg(extra_json, "--extra") if extra_json is not None else None
    if to is not None and rollback:
        raise click.UsageError("--to and --rollback do not go together")
    if to is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", to):
        raise click.BadParameter("--to must be MODULE:CLASS")
    cfg = _load(config_path)
    if cfg.resolve_kind(kind) is None:
        allowed = ", ".join(sorted(cfg.kinds)) or "none"
        click.echo(f"mesh: NotAllowed: kind {kind!r} is not in the config's allow-list ({allowed}) {_see('NotAllowed')}",
                   err=True)
        sys.exit(1)
    result = _run(lambda c: c.upgrade(kind, to, extra, rollback), cfg)
    click.echo(_to_json(result))
    sys.exit(1 if result["failed"] else 0)


@main.command(epilog="""Example: mesh drain n2""")
@config_option
@click.argument("node")
def drain(config_path, key, node):
    """Move every agent off NODE, each with its state, and place nothing there until undrain;
    prints {"node", "draining", "moved", "failed"}, exits 1 unless every agent moved."""
    cfg = _load(config_path)
    if node not in cfg.nodes:
        raise click.BadParameter(f"no node {node!r} in {cfg.path}")
    result = _run(lambda c: c.drain(node), cfg)
    click.echo(_to_json(result))
    sys.exit(1 if result.get("failed") else 0)


@main.command(epilog="""Example: mesh undrain n2""")
@config_option
@click.argument("node")
def undrain(config_path, key, node):
    """NODE takes placements again (agents moved off it stay where they are)."""
    cfg = _load(config_path)
    if node not in cfg.nodes:
        raise click.BadParameter(f"no node {node!r} in {cfg.path}")
    click.echo(_to_json(_run(lambda c: c.undrain(node), cfg)))


@main.command(epilog="""Example: mesh restart n2""")
@config_option
@click.argument("node")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True,
              help="seconds for the whole restart")
def restart(config_path, key, node, timeout):
    """Drain NODE, have its launcher start it again as a new process running the code on
    disk, undrain it; prints {"node", "restarted", "moved", "failed", "old_pid", "pid"},
    exits 1 unless it restarted. Run it node after node for a rolling restart."""
    cfg = _load(config_path)
    if node not in cfg.nodes:
        raise click.BadParameter(f"no node {node!r} in {cfg.path}")
    result = _run(lambda c: c.restart(node, timeout), cfg)
    click.echo(_to_json(result))
    sys.exit(0 if result["restarted"] else 1)


@main.command(epilog="""Example: mesh demo --users 3 --turns 4   |   mesh demo --scene pool""")
@click.option("--scene", type=click.Choice(["conversations", "pool"]), default="conversations", show_default=True,
              help="conversations that survive a kill -9, or a pool of embedding models that serves through one")
@click.option("--users", type=click.IntRange(1, 200), default=6, help="simulated users, one conversation agent each")
@click.option("--turns", type=click.IntRange(1, 100), default=8, help="turns per conversation")
@click.option("--llm-url", default=None, help="an OpenAI-compatible API instead of the stand-in (e.g. http://host:8000/v1)")
@click.option("--model", default="stand-in", help="the model name to ask the API for")
@click.option("--keep", is_flag=True, help="keep the temporary data folder")
def demo(scene, users, turns, llm_url, model, keep):
    """Conversations on a three-node mesh; a node is killed midway; nothing is lost.
    With --scene pool: a pool of three local embedding models (the serving extra) keeps
    answering while the node of one is killed."""
    say = lambda line: click.echo(line)  # noqa: E731
    if scene == "pool":
        from . import demo_pool
        sys.exit(demo_pool.run(keep=keep, say=say))
    from . import demo as demo_mod
    sys.exit(demo_mod.run(users, turns, llm_url, model, keep, say))


@main.command(epilog="""Example: mesh keys --all -c cluster.toml""")
@click.argument("name", required=False)
@click.option("--dir", "directory", default="keys", show_default=True, help="where to write the key files")
@click.option("--role", type=click.Choice(["node", "admin", "client"]), default="node", show_default=True)
@click.option("-c", "--config", "config_path", default=None,
              help="with --all: create the missing key files of every node and client of this config")
@click.option("--all", "all_", is_flag=True, help="create every key file the config needs and lacks")
def keys(name, directory, role, config_path, all_):
    """Create a CURVE key pair NAME.key / NAME.key_secret and print the config lines for it."""
    from .security import create_keypair
    from .wire import valid_name
    if all_:
        _all_keys(config_path)
        return
    if not name:
        raise click.UsageError("name the key pair to create, or use -c CONFIG --all")
    if not valid_name(name):
        raise click.BadParameter(f"{name!r} is not a valid name")
    if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
        raise click.UsageError(f"{directory}/{name}.key_secret exists already; remove it first to replace it")
    public_path, secret_path = create_keypair(directory, name)
    with open(public_path) as f:
        public = next(line.split('"')[1] for line in f if "public-key" in line)
    click.echo(f"wrote {secret_path} (owner-only) and {public_path}")
    click.echo("add to the cluster config:\n")
    if role == "node":
        click.echo(f"[nodes.{name}]\npublic_key = \"{public}\"")
        click.echo(f"\nand copy {secret_path} into [security] keys_dir on {name}'s host")
    else:
        click.echo(f"[security.clients.{name}]\npublic_key = \"{public}\"\nrole = \"{role}\"")
        click.echo(f"\nand connect with: mesh call --key {secret_path} NAME JSON (or MESH_KEY={secret_path})")


@main.command(epilog="""Example: mesh certs -c configs/cluster3.toml""")
@config_only
def certs(config_path):
    """Create the TLS files of [control] tls_dir: a CA and a certificate for each host."""
    from pathlib import Path
    from .certs import CertError, make_all
    cfg = _load(config_path)
    if cfg.control is None or not cfg.control.tls:
        raise click.UsageError(f"{cfg.path} has no [control] tls_dir: there is nothing to make")
    try:
        made = make_all(Path(cfg.control.tls_dir), cfg.name, {h.name: h.address for h in cfg.hosts.values()})
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(made)} files in {cfg.control.tls_dir}")
    click.echo("each host needs ca.crt and its own HOST.crt and HOST.key there; keep ca.key where you made them")


def _all_keys(config_path: str | None) -> None:
    """Create KEYS_DIR/NAME.key(_secret) for every node and client the config lists."""
    import tomllib
    from .security import create_keypair
    path = config_path or config_mod.DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(f"config error: {path}: {exc} {_see('config-errors')}") from None
    security = raw.get("security", {}) if isinstance(raw.get("security"), dict) else {}
    keys_dir = security.get("keys_dir", "keys")
    if not os.path.isabs(keys_dir):
        keys_dir = os.path.join(os.path.dirname(os.path.abspath(path)), keys_dir)
    names = list((raw.get("nodes") or {}).keys()) + list((security.get("clients") or {}).keys())
    for name in names:
        if os.path.exists(os.path.join(keys_dir, f"{name}.key_secret")):
            click.echo(f"{name}: exists")
            continue
        create_keypair(keys_dir, name)
        click.echo(f"{name}: created in {keys_dir}")
    click.echo("copy each node's NAME.key_secret to its host only; every host needs all the NAME.key files")


def _agent_status(agent: dict) -> str:
    if agent["status"] == "backoff":  # a crash loop, slowed down
        return f"backoff {agent.get('restart_in_s', 0):g}s ({agent.get('streak', 0)} in a row)"
    return agent["status"]


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


if __name__ == "__main__":
    main()
