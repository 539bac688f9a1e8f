"""The local embedding model: scripts/make_model.py builds a real ONNX model, and
nodes/local_embedder.py serves it, directly and through a real mesh of processes."""

import asyncio
import subprocess
import sys

import pytest

import mesh
from procs import ROOT, MeshRun, write_config

np = pytest.importorskip("numpy", reason="the serving extra (scripts/with-venv installs it)")
pytest.importorskip("onnxruntime", reason="the serving extra")
from nodes.local_embedder import Model  # noqa: E402  (after the checks above)

ANIMALS = ["the cat chased a mouse", "my dog has a long tail", "a fox and a wolf in the wood"]
WEATHER = ["rain and cold wind today", "a storm with thunder in the sky", "the forecast says snow"]
COMPUTERS = ["the server ran out of memory", "python code with a bug", "the laptop keyboard broke"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_the_built_model_puts_similar_texts_together(model_dir):
    assert_topics_and_padding(Model(model_dir))


def test_a_model_with_feed_forward_layers_keeps_the_topics(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(tmp_path), "--layers", "2",
                        "--hidden", "96"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = Model(tmp_path)
    assert len(m.session.get_inputs()) == 3 and "2x96" in m.session.get_modelmeta().graph_name
    assert_topics_and_padding(m)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(tmp_path), "--layers", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not negative" in r.stderr and "Traceback" not in r.stderr


def assert_topics_and_padding(m):
    texts = ANIMALS + WEATHER + COMPUTERS
    topic = np.repeat(np.arange(3), 3)
    v = m.embed(texts)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    sims = v @ v.T
    for i in range(len(texts)):  # each text is nearer every text of its topic than any other
        same = (topic == topic[i]) & (np.arange(len(texts)) != i)
        assert sims[i][same].min() > sims[i][topic != topic[i]].max(), texts[i]
    # the same text alone or padded in a batch with longer ones gives the same vector
    alone = m.embed(["python code"])[0]
    padded = m.embed(["python code", "a very long sentence about the rain and the cold wind in the sky"])[0]
    assert np.allclose(alone, padded, atol=1e-6)


def test_the_same_seed_builds_the_same_files(model_dir, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for name in ("model.onnx", "tokenizer.json", "corpus.txt"):
        assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes()


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx is missing"):
        Model(tmp_path)


KIND = 'local_embedder = "nodes.local_embedder:LocalEmbedder"\n'


@pytest.fixture
def mesh_run(tmp_path):
    runs = []

    def start():
        cfg = write_config(tmp_path, nodes=2)
        text = cfg.read_text()
        cfg.write_text(text.replace("[kinds]\n", "[kinds]\n" + KIND, 1))
        runs.append(MeshRun("up", "-c", str(cfg)).start())
        return cfg, runs[-1]
    yield start
    for run in runs:
        run.stop()


async def test_the_local_model_through_the_mesh_and_after_kill_9(mesh_run, model_dir):
    cfg, run = mesh_run()
    direct = Model(model_dir)
    async with mesh.connect(cfg) as m:
        placed = await m.spawn("emb", "local_embedder", {"model_dir": str(model_dir), "batch_size": 16,
                                                             "batch_timeout_ms": 50})
        one = await m.call("emb", {"text": ANIMALS[0]})
        assert np.allclose(one, direct.embed([ANIMALS[0]])[0], atol=1e-6)
        many = await asyncio.gather(*(m.call("emb", {"texts": [t, t]}) for t in WEATHER + COMPUTERS))
        assert all(np.allclose(pair[0], pair[1]) for pair in many)
        stats = await m.call("emb", {"op": "stats"})
        assert stats["model"] == "ready" and stats["inputs"] == 13 and stats["batches"] < 7  # batched
        run.kill_node(placed["node"])  # the agent starts again elsewhere and loads the model again
        again = await m.call("emb", {"text": ANIMALS[0]}, timeout=20)
        assert np.allclose(again, one, atol=1e-6)
        assert (await m.call("emb", {"op": "stats"}))["inputs"] == 1  # a new incarnation's figures
