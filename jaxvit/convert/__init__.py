"""Checkpoint layouts of the peers and safe readers/writers for their files.

``layouts`` holds the pure key/array mappings between each peer's parameter
names and jaxvit's (no I/O); ``files`` reads and writes ``.npz``,
safetensors and (when PyTorch is installed) ``.pth`` files without ever
unpickling arbitrary objects. ``jaxvit.pretrained`` puts them together.
"""
