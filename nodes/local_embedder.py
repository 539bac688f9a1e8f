"""local_embedder: sentence embeddings from an ONNX model run inside the agent.

    call {"text": "..."}            -> [float, ...]         (unit length)
    call {"texts": ["...", "..."]}  -> [[float, ...], ...]
    call {"op": "stats"}            -> batches, inputs, mean batch, queue and inference ms

args: {"model_dir": PATH, "batch_size": 32, "batch_timeout_ms": 5, "queue": 256,
       "max_tokens": 256, "threads": 1}

Same call shape as `embedder`, but the model runs here, in the agent's worker thread
(mesh.serving), not behind an HTTP API. `model_dir` holds `model.onnx` and
`tokenizer.json`, the layout of a sentence-transformers ONNX export (or what
scripts/make_model.py builds). The model's inputs are read from the session
(`input_ids`, `attention_mask`, and `token_type_ids` when it has one; int64 or int32).
A `sentence_embedding` output is used as it is (it includes the export's own pooling
and Dense/Normalize layers); otherwise the first output, the token vectors, is
mean-pooled over the attention mask. Every vector is L2-normalised.

Why these settings: onnxruntime releases the GIL while it runs, so a worker thread
leaves the node's loop free; spin-waiting is off (its threads would otherwise keep the
cores busy between runs and starve the loop); tokenizing holds the GIL, so batches are
bounded (`batch_size`, and `max_tokens` per text). Padding and truncation are set once,
at load: changing them while another thread encodes is not safe.

Needs the `serving` extra (onnxruntime, tokenizers, numpy). They are imported by
`load`, not by this module, so a mesh without them still starts (and this kind fails
to load with a clear error, which its supervisor sees).
"""

from __future__ import annotations

from pathlib import Path

from mesh import BadRequest
from mesh.serving import Serving


class Model:
    """An ONNX sentence-embedding model and its tokenizer, ready to embed batches of texts.
    Safe to share between threads once built (onnxruntime sessions are)."""

    def __init__(self, model_dir: str | Path, max_tokens: int = 256, threads: int = 1):
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.np = np
        path = Path(model_dir)
        for name in ("model.onnx", "tokenizer.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing (see scripts/make_model.py, or the README)")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        pad_id, pad_token = _pad(self.tokenizer)
        # some exports pad every text to a fixed length: pad to the longest in the batch
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.tokenizer.enable_truncation(max_length=max_tokens)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (np.int32 if i.type == "tensor(int32)" else np.int64) for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(self.inputs)
        if missing:
            raise ValueError(f"{path / 'model.onnx'} has no input {sorted(missing)}: not a text embedding model")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]

    def embed(self, texts: list[str]):
        """Unit vectors of `texts`, as a float32 array [len(texts), dim]."""
        np = self.np
        encodings = self.tokenizer.encode_batch(texts)
        feed = {"input_ids": np.array([e.ids for e in encodings], dtype=self.inputs["input_ids"]),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=self.inputs["attention_mask"])}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=self.inputs["token_type_ids"])
        out = self.session.run([self.output], feed)[0]
        if out.ndim == 3:  # token vectors: the mean over the real tokens
            mask = feed["attention_mask"].astype(np.float32)[:, :, None]
            out = (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _pad(tokenizer) -> tuple[int, str]:
    """The tokenizer's own padding token (BERT's [PAD] is 0; RoBERTa's and MPNet's <pad> is 1)."""
    for token in ("[PAD]", "<pad>"):
        i = tokenizer.token_to_id(token)
        if i is not None:
            return i, token
    return 0, "[PAD]"


class LocalEmbedder(Serving):
    batch_size = 32
    batch_timeout_ms = 5

    def load(self, args):
        if not isinstance(args.get("model_dir"), str):
            raise ValueError("local_embedder needs args {'model_dir': PATH}")
        self.model = Model(args["model_dir"], int(args.get("max_tokens", 256)), int(args.get("threads", 1)))

    def inputs(self, msg):
        if isinstance(msg, dict) and isinstance(msg.get("text"), str):
            return [msg["text"]], False
        if isinstance(msg, dict) and isinstance(msg.get("texts"), list) and all(isinstance(t, str) for t in msg["texts"]):
            return msg["texts"], True
        raise BadRequest("local_embedder: send {'text': str} or {'texts': [str, ...]}")

    def predict_batch(self, texts):
        return self.model.embed(texts).tolist()
