"""Serves all-MiniLM-L6-v2 sentence embeddings: UTF-8 text in, 384 normalised floats out.

This file is copied into each version directory as `model.py`, beside the files it loads:

- `tokenizer.json`: the model's WordPiece tokenizer, run by the `tokenizers` package;
- `encoder.onnx`: the transformer with mean pooling and L2 normalisation, exported by build.py;
- `minilm.json`: `max_tokens` (longer texts are truncated, as sentence-transformers does) and
  `bucketing`.

The packaged tokenizer pads every text to 128 tokens. Here padding is off: each call pads only
to the longest text it runs. With `bucketing` on, the texts of one batch are sorted by token
count and run in groups of similar length, so a short sentence batched with a long paragraph
is not padded to the paragraph's length. Output order always follows input order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from servekit.core.errors import InvalidInputError
from servekit.runtimes.base import RuntimeOptions

# A group takes texts up to this many times its shortest text's tokens, plus the slack.
_GROUP_RATIO = 1.25
_GROUP_SLACK = 8


class Model:
    inputs = (("text", "BYTES", (-1,)),)
    outputs = (("embedding", "FP32", (-1, 384)),)

    def load(self, directory: Path, options: RuntimeOptions) -> None:
        settings = json.loads((directory / "minilm.json").read_text())
        self.bucketing = bool(settings.get("bucketing", True))
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(settings.get("max_tokens", 256)))
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        spinning = "1" if options.spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(
            str(directory / "encoder.onnx"), session_options, providers=["CPUExecutionProvider"]
        )

    def predict(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        texts = [_decode(item, row) for row, item in enumerate(inputs["text"])]
        encodings = self.tokenizer.encode_batch(texts)
        embeddings = np.empty((len(texts), 384), dtype=np.float32)
        lengths = [len(encoding.ids) for encoding in encodings]
        for group in length_groups(lengths, self.bucketing):
            embeddings[group] = self._encode([encodings[index] for index in group])
        return {"embedding": embeddings}

    def _encode(self, encodings: list[Any]) -> np.ndarray[Any, Any]:
        """Run one group, padded to its longest member."""
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        result: np.ndarray[Any, Any] = self.session.run(None, feed)[0]
        return result


def length_groups(lengths: list[int], bucketing: bool) -> list[list[int]]:
    """Split row indices into groups to run together: one group, or groups of similar length."""
    if not bucketing:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[index] <= lengths[groups[-1][0]] * _GROUP_RATIO + _GROUP_SLACK:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _decode(item: Any, row: int) -> str:
    try:
        return bytes(item).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"text {row} is not valid UTF-8: {exc.reason}") from None
