"""Sentence embeddings from all-MiniLM-L6-v2: a tokenizer and an ONNX encoder in one Python model.

`python -m servekit.examples.minilm OUTPUT_DIR` builds a version of the model (see build.py);
`model.py` is the file it serves, and `sentences.py` gives texts to test and measure it with.
"""
