"""Built-in plugin ``fused_losses``: loss kernels that never build the [N, V] logits.

``chunked`` (torch, any device) claims ``loss.kernel = "auto"`` everywhere but on CUDA with triton
installed, where ``triton`` claims it. Both can be forced by name; ``reference`` (plugin
``losses``) stays the ``trylast`` fallback and can be forced too.
"""

from __future__ import annotations

import importlib.util

from distill import PluginError, hookimpl
from distill.plugins.fused_losses.chunked import CHUNKED_KERNEL, ChunkedKernel

__all__ = ["CHUNKED_KERNEL", "ChunkedKernel"]


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@hookimpl
def distill_select_loss_kernel(loss: str, kernel: str, device: str, dtype: str):
    if kernel == "triton" or (kernel == "auto" and device == "cuda" and _triton_installed()):
        if not _triton_installed():
            raise PluginError(
                "loss.kernel = \"triton\" needs triton: pip install 'distill[triton]' "
                "(or use loss.kernel = \"auto\")."
            )
        from distill.plugins.fused_losses.triton_kernel import TRITON_KERNEL

        return TRITON_KERNEL
    if kernel in ("auto", CHUNKED_KERNEL.name):
        return CHUNKED_KERNEL
    return None
