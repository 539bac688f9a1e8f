"""Placement and incarnation numbering, as the pure functions the supervisor uses."""

import textwrap
from collections import Counter

from mesh import config as config_mod, placement
from mesh.supervision import ChildSpec, Placement

CONFIG = """
[kinds]
counter = "nodes.counter:Counter"

[hosts.h1]
address = "127.0.0.1"
[hosts.h2]
address = "127.0.0.2"
tags = ["gpu"]
[hosts.h3]
address = "127.0.0.3"

[nodes.a]
host = "h1"
port = 1
[nodes.b]
host = "h2"
port = 1
[nodes.c]
host = "h3"
port = 1
[nodes.d]
host = "h3"
port = 2
"""


def cfg(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(CONFIG))
    return config_mod.load(path)


def test_incarnations_grow_and_pass_what_they_must():
    assert placement.next_incarnation(3, 0) == (3_000_000_001, 1)
    assert placement.next_incarnation(3, 1) == (3_000_000_002, 2)
    inc, n = placement.next_incarnation(3, 1, at_least=3_000_000_040)   # a number seen elsewhere
    assert inc == 3_000_000_041 and placement.next_incarnation(3, n)[0] == 3_000_000_042
    assert placement.next_incarnation(4, 0)[0] > inc                   # a new epoch passes them all


def test_candidates_follow_the_spec_and_keep_off_full_hosts_while_others_can_take_it(tmp_path):
    c = cfg(tmp_path)
    anywhere, gpu = ChildSpec("x", "counter"), ChildSpec("y", "counter", placement=Placement(tags=("gpu",)))
    assert placement.candidates(c, anywhere, ["a", "b", "c"], set()) == ["a", "b", "c"]
    assert placement.candidates(c, gpu, ["a", "b", "c"], set()) == ["b"]
    assert placement.candidates(c, anywhere, ["a", "b", "c"], {"h1", "h2"}) == ["c"]
    assert placement.candidates(c, anywhere, ["a"], {"h1"}) == ["a"]  # nowhere else: a full host will do
    assert placement.candidates(c, gpu, ["a", "c"], set()) == []


def test_the_node_chosen_is_the_preferred_then_off_the_avoided_host_then_the_least_loaded(tmp_path):
    c = cfg(tmp_path)
    load = Counter({"a": 5, "b": 1, "c": 0, "d": 9}).__getitem__
    assert placement.choose_node(c, ["a", "b", "c", "d"], load, prefer="a") == "a"
    assert placement.choose_node(c, ["a", "b", "c", "d"], load) == "c"
    assert placement.choose_node(c, ["a", "b", "c", "d"], load, avoid="d") == "b"   # not c: d's host
    assert placement.choose_node(c, ["d"], load, avoid="d") == "d"                  # the only one
    assert placement.choose_node(c, [], load) is None


def test_replicas_prefer_hosts_with_room_then_the_ones_that_have_the_copies_then_the_least_used():
    live, use = {"h1", "h2", "h3"}, Counter({"h2": 4, "h3": 1})
    assert placement.choose_replicas(0, live, "h1", set(), (), use) == ()
    assert placement.choose_replicas(1, live, "h1", set(), (), use) == ("h3",)
    assert placement.choose_replicas(1, live, "h1", set(), ("h2",), use) == ("h2",)   # its copies are current
    assert placement.choose_replicas(1, live, "h1", {"h2"}, ("h2",), use) == ("h3",)  # but h2 is full
    assert placement.choose_replicas(2, live, "h1", {"h2"}, (), use) == ("h3", "h2")
    assert placement.choose_replicas(3, live, "h1", set(), (), use) is None


def test_a_new_incarnation_reads_one_live_node_of_each_set_it_is_not_in():
    on = {"h1": "a", "h2": "b", "h3": None}.get
    assert placement.sources([], "h1", on) == []
    assert placement.sources([("h1", "h2")], "h1", on) == []
    assert placement.sources([("h2", "h3"), ("h3", "h1")], "h1", on) == [["b"]]
    assert placement.sources([("h3",)], "h1", on) is None       # no live node holds that set
