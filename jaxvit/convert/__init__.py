"""Checkpoint layouts of the peers and safe readers/writers for their files.

One module per checkpoint format (``vision_transformer``, ``big_vision``,
``timm``, ``timm_dinov3``, ``hf_vit``, ``hf_clip``, ``hf_siglip``,
``hf_dinov2``, ``hf_dinov3``, ``hf_deit``), each a row of ``registry``.
``layouts`` holds the shared key/array mappings (no I/O), ``files`` reads and
writes ``.npz``, safetensors and (when PyTorch is installed) ``.pth`` files
without ever unpickling, ``validate`` checks everything that comes from a
file before it is used, ``checkpoint`` is what a format reads into, and
``scan`` converts scanned <-> unrolled parameter trees. ``jaxvit.pretrained``
puts them together.
"""
