"""Triton kernels of villa_fast, installed as ``villa_fast.kernels``.

Importing a submodule imports Triton; the ops layer does that lazily, only
when the Triton backend is chosen. On a CPU machine the kernels run only under
the Triton interpreter (``TRITON_INTERPRET=1`` set before the import).
"""
