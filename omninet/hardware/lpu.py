"""LPU (Groq and similar inference accelerators): there is no PyTorch device for them. The honest
path is to export the configured model to ONNX and hand that file to the vendor's compiler
(e.g. Groq's toolchain ingests ONNX). Shapes are static (``batch_size``, ``seq_len``), which is
what such compilers require.

``export_onnx`` uses ``torch.onnx.export`` (the torch.export-based exporter), which needs the
``onnx`` and ``onnxscript`` packages (``pip install omninet[lpu]``). Token ids go in; the
wrapper embeds them without the model's Python-side id range check (ONNX graphs cannot raise),
so out-of-range ids are the caller's responsibility in the exported graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omninet.hardware.base import lazy_import
from omninet.model import OmniNetModel

__all__ = ["export_onnx", "onnx_available"]


def onnx_available() -> str | None:
    """None when ONNX export can run here, else the reason it cannot."""
    missing = [m for m in ("onnx", "onnxscript") if lazy_import(m) is None]
    return None if not missing else f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript"


class _TokensToLogits(nn.Module):
    """input_ids (B, N) -> logits; embeds like ``OmniNetModel.embed_tokens`` (eval: no dropout)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed(input_ids)  # (B, N, C)
        if m.pos is not None:
            x = x + m.pos(input_ids.shape[1])
        if m.config.arch == "encoder_decoder":
            raise ValueError("export_onnx supports encoder and decoder models; export encoder-decoders per stack")
        return m(inputs_embeds=x).logits


def export_onnx(model: nn.Module, path: str | Path, *, seq_len: int, batch_size: int = 1,
                opset_version: int | None = None) -> Path:
    """Writes ``model`` (an ``OmniNetModel``, encoder or decoder, fp32) as an ONNX graph taking
    ``input_ids`` int64 [batch_size, seq_len] and returning ``logits``. Returns the path."""
    if not isinstance(model, OmniNetModel):
        raise ValueError(f"export_onnx takes an OmniNetModel, got {type(model).__name__}")
    if model.config.arch == "encoder_decoder":
        raise ValueError("export_onnx supports arch 'encoder' and 'decoder'; encoder_decoder needs two graphs (not built)")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if model.pos is not None and seq_len > model.config.max_seq_length:
        raise ValueError(f"seq_len={seq_len} exceeds max_seq_length={model.config.max_seq_length} of learned positions")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export an fp32 model (int8 dynamic quantization and cast weights do not export); "
                         "LPU compilers apply their own quantization")
    reason = onnx_available()
    if reason is not None:
        raise ValueError(reason)
    was_training = model.training
    model.eval()
    try:
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=next(model.parameters()).device)
        program = torch.onnx.export(_TokensToLogits(model).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                    output_names=["logits"], opset_version=opset_version, verbose=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(path))
    finally:
        model.train(was_training)
    return path
