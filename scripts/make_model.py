#!/usr/bin/env python3
"""Build a small but real sentence-embedding model into DIR, for tests, benchmarks and demos.

    python3 scripts/make_model.py DIR [--dim 64] [--seed 7]
    python3 scripts/make_model.py DIR --dim 384 --layers 6 --hidden 1536   # MiniLM's cost

DIR gets the layout of a sentence-transformers ONNX export, so `nodes/local_embedder.py`
runs it exactly as it runs a real one:

    model.onnx       inputs input_ids, attention_mask, token_type_ids (int64, [batch, seq]);
                     output last_hidden_state ([batch, seq, dim]): one vector per token
    tokenizer.json   a word-level tokenizer (lowercase, split on spaces and punctuation,
                     [CLS] ... [SEP], [PAD] = 0, [UNK] = 1)
    corpus.txt       the sentences the vocabulary and the vectors were made from

Why this model and not a download: no weights can be fetched here, and a test needs a
model whose answers mean something. The corpus is generated from a few topics (animals,
weather, computers, food, sport, music); each word's vector is built by random indexing
over it: the sum of fixed random vectors of the words it shares sentences with. Words of
one topic share sentences, so their vectors point the same way, and mean pooling over a
sentence's tokens gives similar vectors to sentences on one topic. The same seed gives
the same files, byte for byte (the vocabulary is built here, not by a trainer: trainers
number tokens differently from run to run).

`--layers L --hidden H` adds L position-wise feed-forward blocks (x + relu(x W1) W2, W1
dim x H, W2 H x dim, small weights so the topics survive) between the embedding and the
output: the arithmetic of a small sentence encoder (MiniLM-L6: 6 layers, 384 wide,
1536 inside), without its attention. The tiny default runs tens of thousands of texts a
second, faster than the mesh carries one-text calls; the layered one costs about what a
real encoder costs per text, which is what a serving benchmark needs to measure the
serving and not the calls.

Needs numpy, onnx and tokenizers (the `serving` extra). `onnx` takes a second to import;
only this build script uses it, never the mesh at run time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TOPICS = {
    "animals": "cat dog horse cow bird fish rabbit mouse lion tiger wolf bear fox owl duck sheep pet fur tail paws",
    "weather": "rain snow wind storm cloud sun sunny cold warm hot fog thunder forecast temperature umbrella ice sky",
    "computers": "computer laptop keyboard screen software program code server network memory disk processor "
                 "database bug compile python linux",
    "food": "bread cheese apple soup pasta rice pizza salad cake coffee tea breakfast dinner cook kitchen recipe eat",
    "sport": "football tennis match goal team player score race run swim coach ball win stadium league",
    "music": "song guitar piano drum concert band singer melody album violin rhythm orchestra jazz rock sing",
}
GLUE = "the a an my our this that is are was were very and with in on of to it we they i you".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
OPSET, IR_VERSION = 17, 8  # pinned: onnx's defaults are newer than many deployed runtimes


def corpus(seed: int, per_topic: int = 200) -> list[str]:
    """Sentences of 5 to 9 words: topic words with a few common words between them."""
    rng = random.Random(seed)
    lines = []
    for topic, words in TOPICS.items():
        words = words.split()
        for _ in range(per_topic):
            n = rng.randint(5, 9)
            lines.append(" ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(GLUE) for _ in range(n)))
    rng.shuffle(lines)
    return lines


def vectors(lines: list[str], vocab: dict[str, int], dim: int, seed: int):
    """Random indexing: a word's vector is the sum of the index vectors of the words in its
    sentences, less the mean of all words' (the part every sentence shares); common words
    (in every topic) end up short before normalisation, near the middle of all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    index = rng.standard_normal((len(vocab), dim)).astype(np.float32)
    table = np.zeros((len(vocab), dim), dtype=np.float32)
    for line in lines:
        ids = [vocab[w] for w in line.split()]
        context = index[ids].sum(axis=0)
        for i in ids:
            table[i] += context - index[i]
    table -= table[len(SPECIAL):].mean(axis=0)  # what every sentence shares says nothing
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    table = np.where(norms > 0, table / np.maximum(norms, 1e-9), 0.0).astype(np.float32)
    table[[vocab[s] for s in SPECIAL]] = 0.0  # [PAD], [UNK], [CLS], [SEP] weigh nothing
    return table


def tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def graph(table, layers: int = 0, hidden: int = 0, seed: int = 7):
    """last_hidden_state = word_embeddings[input_ids] + type_embeddings[token_type_ids],
    through `layers` feed-forward blocks. attention_mask is an input, as in the exports
    this stands for; pooling happens outside."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim = table.shape[1]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", dim])
    nodes = [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["words"], axis=0),
        helper.make_node("Gather", ["type_embeddings", "token_type_ids"], ["kinds"], axis=0),
        helper.make_node("Add", ["words", "kinds"], ["summed"]),
    ]
    inits = [numpy_helper.from_array(table, "word_embeddings"),
             numpy_helper.from_array(np.zeros((2, dim), dtype=np.float32), "type_embeddings"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis")]
    rng = np.random.default_rng(seed + 1)
    x = "summed"
    for i in range(layers):
        w1 = (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32)
        w2 = (rng.standard_normal((hidden, dim)) * (0.1 / np.sqrt(hidden))).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"ff{i}_in"), numpy_helper.from_array(w2, f"ff{i}_out")]
        nodes += [helper.make_node("MatMul", [x, f"ff{i}_in"], [f"up{i}"]),
                  helper.make_node("Relu", [f"up{i}"], [f"act{i}"]),
                  helper.make_node("MatMul", [f"act{i}", f"ff{i}_out"], [f"down{i}"]),
                  helper.make_node("Add", [x, f"down{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    nodes += [
        # multiply by the mask, as a transformer's attention would ignore padding
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", [x, "mask_3d"], ["last_hidden_state"]),
    ]
    name = "mesh-tiny-embedder" if not layers else f"mesh-embedder-{layers}x{hidden}"
    g = helper.make_graph(nodes, name, [ids, mask, types], [out], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mesh make_model")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build(out: Path, dim: int = 64, seed: int = 7, layers: int = 0, hidden: int = 0) -> Path:
    lines = corpus(seed)
    words = sorted({w for line in lines for w in line.split()})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    table = vectors(lines, vocab, dim, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer(vocab).save(str(out / "tokenizer.json"))
    (out / "model.onnx").write_bytes(graph(table, layers, hidden, seed).SerializeToString())
    config = {"model_type": "mesh-tiny-embedder", "hidden_size": dim, "vocab_size": len(vocab), "pooling": "mean"}
    if layers:
        config.update(model_type="mesh-embedder", num_hidden_layers=layers, intermediate_size=hidden)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="where to write model.onnx and tokenizer.json")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--layers", type=int, default=0, help="feed-forward blocks after the embedding (default none)")
    p.add_argument("--hidden", type=int, default=0, help="their inner width (default 4 x dim)")
    a = p.parse_args(argv)
    if a.dim < 1 or a.layers < 0 or a.hidden < 0:
        p.error("--dim must be at least 1, --layers and --hidden not negative")
    try:
        build(a.dir, a.dim, a.seed, a.layers, a.hidden or 4 * a.dim)
    except ImportError as exc:
        print(f"make_model: {exc.name} is missing: pip install -e '.[serving]'", file=sys.stderr)
        return 2
    print(f"wrote {a.dir}/model.onnx and tokenizer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
