"""The torch side of tierserve: partition a BERT-family encoder, train exits, calibrate, export.

Needs the `build` extra (torch, transformers, onnxscript, matplotlib, tqdm).
"""
