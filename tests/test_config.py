"""Config files load into frozen objects, and every mistake names file, key and reason."""

import os
import textwrap

import pytest

from mesh import config
from mesh.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = """
[kinds]
counter = "nodes.counter:Counter"

[hosts.h1]
address = "127.0.0.1"

[nodes.n1]
host = "h1"
port = 7001

[nodes.n2]
host = "h1"
port = 7002
"""


def load(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def test_shipped_local_config_loads():
    cfg = config.load(os.path.join(ROOT, "configs", "local.toml"))
    assert list(cfg.nodes) == ["n1", "n2", "n3"]
    assert cfg.supervisor_node == "n1"
    assert cfg.tree["stats"].strategy == "one_for_all"
    assert cfg.tree["sessions"].dynamic
    assert cfg.agents["hits"].kind == "counter"
    assert os.path.isabs(cfg.data_dir)


def test_defaults_add_root_and_dynamic_supervisor(tmp_path):
    cfg = load(tmp_path, BASE + '\n[agents.a]\nkind = "counter"\n')
    assert cfg.tree["root"].children == ("dynamic", "a")
    assert cfg.tree["dynamic"].dynamic
    assert cfg.data_dir == str((tmp_path / ".." / "var" / "c").resolve())
    assert cfg.resolve_kind("counter") == "nodes.counter:Counter"
    assert cfg.resolve_kind("nodes.counter:Counter") == "nodes.counter:Counter"
    assert cfg.resolve_kind("os:system") is None


def test_restart_backoff_per_supervisor(tmp_path):
    cfg = load(tmp_path, BASE + "\n[tree.s]\nbackoff_s = 0\n[tree.t]\nbackoff_s = 0.5\nbackoff_max_s = 30\n"
                              "[tree.root]\nchildren = ['s', 't']\n")
    assert (cfg.tree["s"].backoff_s, cfg.tree["t"].backoff_s, cfg.tree["t"].backoff_max_s) == (0.0, 0.5, 30.0)
    assert (cfg.tree["root"].backoff_s, cfg.tree["root"].backoff_max_s) == (0.1, 5.0)
    assert cfg.tree["root"].children == ("dynamic", "s", "t")  # the implicit dynamic one keeps its place


@pytest.mark.parametrize("extra, key, reason", [
    ("[cluster]\nhearbeat_ms = 5\n", "cluster.hearbeat_ms", "unknown key"),
    ("[cluster]\nheartbeat_ms = 'fast'\n", "cluster.heartbeat_ms", "must be int"),
    ("[cluster]\nheartbeat_ms = 0\n", "cluster.heartbeat_ms", "must be positive"),
    ("[cluster]\nlease_ms = 5000\n", "cluster.lease_ms", "must be shorter"),
    ("[cluster]\nsecure = 1\n", "cluster.secure", "must be bool"),
    ("[nodes.n3]\nhost = 'h1'\nport = 7001\n", "nodes.n3.port", "also used by node 'n1'"),
    ("[nodes.n3]\nhost = 'h9'\nport = 7003\n", "nodes.n3.host", "no host named 'h9'"),
    ("[nodes.n3]\nhost = 'h1'\nport = 70000\n", "nodes.n3.port", "TCP port"),
    ("[supervisor]\nnode = 'n9'\n", "supervisor.node", "no node named 'n9'"),
    ("[agents.a]\nkind = 'shell'\n", "agents.a.kind", "not in [kinds]"),
    ("[agents.a]\nkind = 'counter'\nrestart = 'often'\n", "agents.a.restart", "must be one of"),
    ("[agents.a]\nkind = 'counter'\nplacement = { hosts = ['h7'] }\n", "agents.a.placement.hosts", "no host named 'h7'"),
    ("[agents.'bad name']\nkind = 'counter'\n", "agents.bad name", "not a valid name"),
    ("[tree.root]\nchildren = ['x']\n", "tree.root.children", "neither a supervisor nor an agent"),
    ("[tree.root]\nchildren = ['s']\n[tree.s]\nchildren = ['root']\n", "tree.s.children", "root supervisor cannot be a child"),
    ("[tree.root]\nchildren = ['a', 'a']\n[agents.a]\nkind = 'counter'\n", "tree.root.children", "also a child of 'root'"),
    ("[tree.root]\nchildren = []\n[agents.a]\nkind = 'counter'\n", "tree.root.children", "'a' is under no supervisor"),
    ("[tree.s]\nstrategy = 'all_for_one'\n", "tree.s.strategy", "must be one of"),
    ("[tree.s]\ndynamic = true\nchildren = ['a']\n[agents.a]\nkind = 'counter'\n", "tree.s", "dynamic supervisor"),
    ("[kinds2]\n", "kinds2", "unknown key"),
    ("[tree.s]\nbackoff_s = -1\n", "tree.s.backoff_s", "must not be negative"),
    ("[tree.s]\nbackoff_s = 2\nbackoff_max_s = 1\n", "tree.s.backoff_max_s", "must be at least backoff_s"),
])
def test_mistakes_name_file_key_and_reason(tmp_path, extra, key, reason):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, BASE + "\n" + extra)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(tmp_path / "c.toml") in str(err.value)


def test_bad_kind_path(tmp_path):
    text = BASE.replace('counter = "nodes.counter:Counter"', 'x = "no-colon"')
    with pytest.raises(ConfigError, match="kinds.x: must be an import path"):
        load(tmp_path, text)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[cluster\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path / "bad.toml")


def test_needs_hosts_and_nodes(tmp_path):
    with pytest.raises(ConfigError, match="at least one host"):
        load(tmp_path, "[kinds]\n")
    with pytest.raises(ConfigError, match="at least one node"):
        load(tmp_path, "[hosts.h]\naddress = '127.0.0.1'\n")


def test_env_variable_names_the_default(tmp_path, monkeypatch):
    path = tmp_path / "e.toml"
    path.write_text(BASE)
    monkeypatch.setenv("MESH_CONFIG", str(path))
    assert config.load(None).path == str(path.resolve())


def test_shipped_cluster_config_loads_once_its_keys_exist(tmp_path):
    import shutil
    from procs import mesh_cmd
    copy = tmp_path / "configs" / "cluster3.toml"
    copy.parent.mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "cluster3.toml"), copy)
    with pytest.raises(ConfigError, match="mesh keys -c cluster3.toml --all"):
        config.load(copy)
    r = mesh_cmd("keys", "-c", str(copy), "--all")
    assert r.returncode == 0, r.stderr
    cfg = config.load(copy)
    assert cfg.secure and cfg.store.replicas == 1 and len(cfg.hosts) == 3
    assert all(n.public_key for n in cfg.nodes.values())
    assert [role for _, role in cfg.security.clients.values()] == ["admin"]


@pytest.mark.parametrize("extra, key, reason", [
    ("[limits]\nmax_message_bytes = 9223372036854775807", "limits.max_message_bytes", "between"),
    ("[store]\nmap_size_mb = 9223372036854775807", "store.map_size_mb", "between"),
    ("[cluster]\ncall_timeout_s = inf", "cluster.call_timeout_s", "finite"),
    ("[cluster]\nheartbeat_ms = 100\ncall_timeout_s = nan", "cluster.call_timeout_s", "finite"),
])
def test_values_that_would_break_the_mesh_are_refused(tmp_path, extra, key, reason):
    """Before: each of these ended in a traceback or a broken mesh."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, BASE + extra)
    assert err.value.key == key and reason in err.value.reason


def test_a_bad_address_and_a_file_that_is_not_utf8_are_named(tmp_path):
    with pytest.raises(ConfigError, match="hosts.h1.address: is not an IP address or a host name"):
        load(tmp_path, BASE.replace('"127.0.0.1"', '"127.0.0.300"'))
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.encode() + b'\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)
    assert load(tmp_path, BASE.replace('"127.0.0.1"', '"localhost"')).hosts["h1"].address == "localhost"


def test_the_stand_in_is_started_only_on_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("MESH_LLM_URL", raising=False)
    cfg = load(tmp_path, BASE + '[llm]\nbase_url = "http://localhost:8701/v1"\nstand_in = true\n')
    assert cfg.llm.stand_in and cfg.llm.stand_in_address() == ("localhost", 8701)
    assert config.load(os.path.join(ROOT, "configs", "local.toml")).llm.stand_in
    with pytest.raises(ConfigError, match=r"llm.stand_in: needs a base_url on loopback"):
        load(tmp_path, BASE + '[llm]\nbase_url = "https://api.example.com/v1"\nstand_in = true\n')
    assert load(tmp_path, BASE + '[llm]\nbase_url = "https://api.example.com/v1"\n').llm.stand_in_address() is None


# --- [control]: etcd behind leadership and leases ----------------------------------------------

THREE_HOSTS = """
[kinds]
counter = "nodes.counter:Counter"

[hosts.h1]
address = "127.0.0.1"
[hosts.h2]
address = "127.0.0.2"
[hosts.h3]
address = "127.0.0.3"

[nodes.n1]
host = "h1"
port = 7001
[nodes.n2]
host = "h1"
port = 7002
[nodes.n3]
host = "h2"
port = 7003
[nodes.n4]
host = "h3"
port = 7004
"""


def _control(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(BASE + text))
    return config.load(path)


def test_no_control_section_means_no_etcd(tmp_path):
    assert load(tmp_path, BASE).control is None


def test_control_members_run_here_give_endpoints_and_candidates(tmp_path):
    cfg = _control(tmp_path, '\n[control]\nmembers = ["h1"]\nclient_port = 23790\npeer_port = 23791\n')
    c = cfg.control
    assert c.endpoints == ("http://127.0.0.1:23790",) and c.members == ("h1",)
    assert c.candidates == ("n1",)           # the first node of each host
    assert cfg.supervisor_node == "n1"
    assert c.prefix == "mesh/c/" and c.lease_s == 1 and not c.tls


def test_control_candidates_default_to_one_node_per_host(tmp_path):
    cfg = load(tmp_path, THREE_HOSTS + '\n[control]\nmembers = ["h1", "h2", "h3"]\n')
    assert cfg.control.candidates == ("n1", "n3", "n4")
    assert cfg.control.endpoints == ("http://127.0.0.1:2379", "http://127.0.0.2:2379", "http://127.0.0.3:2379")


@pytest.mark.parametrize("text, key, words", [
    ('endpoints = ["http://127.0.0.1:2379"]\nmembers = ["h1"]', "control", "not both"),
    ('lease_s = 1', "control", "either endpoints"),
    ('members = ["h9"]', "control.members", "no host named 'h9'"),
    ('members = ["h1"]\ncandidates = ["n9"]', "control.candidates", "no node named 'n9'"),
    ('members = ["h1"]\nlease_s = 0', "control.lease_s", "at least 1"),
    ('members = ["h1"]\nelection_ms = 1000', "control.lease_s", "1.5 x election_ms"),
    ('members = ["h1"]\nheartbeat_ms = 100', "control.election_ms", "5 x heartbeat_ms"),
    ('members = ["h1"]\nclient_port = 2380', "control.peer_port", "must differ"),
    ('endpoints = ["http://10.1.2.3:2379"]', "control.endpoints", "unencrypted"),
    ('endpoints = ["https://10.1.2.3:2379"]', "control.endpoints", "needs tls_dir"),
    ('endpoints = ["etcd:2379"]', "control.endpoints", "not an http(s) URL"),
    ('members = ["h1"]\nlease = 3', "control.lease", "unknown key"),
])
def test_control_mistakes_name_the_key(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as err:
        _control(tmp_path, "\n[control]\n" + text + "\n")
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_control_leaves_no_place_for_a_fixed_supervisor(tmp_path):
    with pytest.raises(ConfigError) as err:
        _control(tmp_path, '\n[supervisor]\nnode = "n2"\n\n[control]\nmembers = ["h1"]\n')
    assert err.value.key == "supervisor.node" and "elected" in str(err.value)
