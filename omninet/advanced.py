"""The model card's API: ``AdvancedTransformer`` over embeddings.

    model = AdvancedTransformer(num_layers=6, hidden_size=512, num_heads=8, ff_dim=2048,
                                max_seq_length=1024, use_sparse_attention=False,
                                use_linformer=False, device_config={'device': 'cpu'})
    output, attention_weights = model(hidden_states=x, attention_mask=mask, head_mask=None)

``hidden_states`` (B, N, hidden) -> ``output`` (B, N, hidden), the final-norm encoder states.
``attention_weights`` is None unless ``output_attentions=True`` is passed: the fused dense
kernel (SDPA) never forms the (N x N) weights, which is why it is fast. With
``output_attentions=True`` the list holds one (B, H, N, N) tensor per layer: the weights each
layer actually used (dense layers switch to the eager reference for that call; block-sparse
layers give their layout's weights, zero off the layout; Linformer layers give the effective
weights P·F over the real tokens).

The two flags (see README, "The seed's flags"): both False -> dense SDPA; sparse only ->
block-sparse; Linformer only -> Linformer; both True (the card's default) -> ``hybrid``:
dense up to 1024 tokens, above that Linformer in the odd encoder layers and block-sparse in
the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from omninet.config import AttentionConfig, ModelConfig, PositionConfig
from omninet.model import Attention, Stack, attention_mask_4d, key_padding_of, prune_layer_heads

if TYPE_CHECKING:
    from omninet.hardware import DeviceConfig

def seed_attention(use_sparse_attention: bool, use_linformer: bool) -> AttentionConfig:
    """Maps the card's two flags to a kernel (see README, "The seed's flags")."""
    from omninet.attention import KERNELS

    wanted = {(False, False): "sdpa", (True, False): "block_sparse", (False, True): "linformer", (True, True): "hybrid"}
    kernel = wanted[(bool(use_sparse_attention), bool(use_linformer))]
    if kernel not in KERNELS:
        raise ValueError(f"use_sparse_attention={use_sparse_attention}, use_linformer={use_linformer} needs the "
                         f"{kernel!r} kernel, which this build does not register; pass both flags as False for dense attention")
    return AttentionConfig(kernel=kernel)


class AdvancedTransformer(nn.Module):
    def __init__(self, *, num_layers: int = 12, hidden_size: int = 1024, num_heads: int = 16, ff_dim: int = 4096,
                 max_seq_length: int = 1024, use_sparse_attention: bool = True, use_linformer: bool = True,
                 device_config: DeviceConfig | dict | None = None, dropout: float = 0.1, position: str = "learned",
                 gradient_checkpointing: bool = False):
        super().__init__()
        from omninet.hardware import as_device_config, resolve_device_config  # late: keeps `import omninet` light

        device_config = as_device_config(device_config)  # unknown keys and bad values fail first, as always
        # What save_pretrained writes to config.json (transformers convention: the constructor's arguments).
        self.init_kwargs = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, ff_dim=ff_dim,
                                max_seq_length=max_seq_length, use_sparse_attention=bool(use_sparse_attention),
                                use_linformer=bool(use_linformer), device_config=device_config.to_dict(),
                                dropout=dropout, position=position, gradient_checkpointing=gradient_checkpointing)
        if not isinstance(ff_dim, int) or ff_dim < 1:
            raise ValueError(f"ff_dim must be a positive integer, got {ff_dim!r}")
        self.config = ModelConfig(
            arch="encoder", vocab_size=1, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            ff_ratio=ff_dim / hidden_size, max_seq_length=max_seq_length, dropout=dropout,
            position=PositionConfig(kind=position), gradient_checkpointing=gradient_checkpointing,
            attention=seed_attention(use_sparse_attention, use_linformer),
        )
        self.placement = resolve_device_config(device_config)
        self.pos = nn.Embedding(max_seq_length, hidden_size) if position == "learned" else None
        self.encoder = Stack(self.config, num_layers=num_layers, causal=False)
        self.drop = nn.Dropout(dropout)
        self.placement.apply(self)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, output_attentions: bool = False):
        x = hidden_states
        C, H, L = self.config.hidden_size, self.config.num_heads, self.config.num_layers
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != C:
            raise ValueError(f"hidden_states must be a float tensor [B, N, hidden_size={C}], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"hidden_states must be floating point (embeddings), got {x.dtype}; embed token ids first")
        param = next(self.parameters())
        if x.device != param.device:
            raise ValueError(f"hidden_states is on {x.device} but the model is on {param.device}; use hidden_states.to({str(param.device)!r})")
        if self.pos is not None:
            if x.shape[1] > self.config.max_seq_length:
                raise ValueError(f"sequence of {x.shape[1]} tokens exceeds max_seq_length={self.config.max_seq_length}; "
                                 "raise max_seq_length or use position='rotary' or 'alibi', which extrapolate")
            x = x + self.pos.weight[: x.shape[1]].to(x.dtype)
        mask = attention_mask_4d(attention_mask, x, "attention_mask", num_heads=H)
        if head_mask is not None:
            if head_mask.shape not in ((H,), (L, H)):
                raise ValueError(f"head_mask must have shape [num_heads={H}] or [num_layers={L}, num_heads={H}], got {list(head_mask.shape)}")
            head_mask = head_mask.expand(L, H)
        out, weights = self.encoder(self.drop(x), mask=mask, key_padding=key_padding_of(mask), head_mask=head_mask,
                                    need_weights=output_attentions)
        return out, weights

    # ---- heads: importance and pruning (the same semantics as OmniNetModel) ------------------
    def attention_layers(self) -> list[Attention]:
        """Self-attention modules in layer order."""
        return [b.attn for b in self.encoder.blocks]

    def prune_heads(self, heads: dict[int, list[int]]) -> None:
        """Physically removes heads ``{layer: [original head ids]}``: their q/k/v rows and output
        columns go, so parameters and FLOPs shrink; the output equals the unpruned model's with
        those heads zeroed by ``head_mask``. Recorded in ``config.heads.pruned_heads`` (and so
        in ``save_pretrained``). Bad ids raise before anything changes."""
        self.config = prune_layer_heads(self.attention_layers(), self.config, heads)

    def head_importance(self, batches, *, loss_fn, normalize: bool = True) -> torch.Tensor:
        """(num_layers, num_heads) gradient importance by original head id (Michel et al. 2019;
        ``omninet.heads.compute_head_importance``). ``batches``: dicts of forward keyword
        arguments (``hidden_states``, ``attention_mask``); ``loss_fn((output, weights), batch)``
        gives the scalar loss (this class has no head of its own)."""
        from omninet.heads import compute_head_importance

        return compute_head_importance(self, batches, loss_fn=loss_fn, normalize=normalize)

    def prune_by_importance(self, importance: torch.Tensor, prune_ratio: float) -> dict[int, list[int]]:
        """Removes the globally least important heads until ``prune_ratio`` of all heads are
        gone (>= 1 per layer); returns ``{layer: [removed ids]}``."""
        from omninet.heads import prune_by_importance

        return prune_by_importance(self, importance, prune_ratio)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ---- persistence (transformers conventions: config.json + model.safetensors) -------------
    def save_pretrained(self, save_directory) -> None:
        """Writes ``config.json`` (the constructor's arguments and the pruned heads) and
        ``model.safetensors`` to ``save_directory`` (created if missing)."""
        from safetensors.torch import save_model

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        pruned = {str(k): v for k, v in sorted(self.config.heads.pruned_heads.items())}
        config = {"model_type": "omninet-advanced", **self.init_kwargs, "pruned_heads": pruned}
        (d / "config.json").write_text(json.dumps(config, indent=2))
        save_model(self, str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, pretrained_model_path, **kwargs) -> "AdvancedTransformer":
        """Rebuilds a model saved by ``save_pretrained``; keyword arguments override the saved
        constructor arguments (e.g. ``device_config={'device': 'cpu'}``). Weights load onto the
        model's device; the result is in eval mode, as in transformers."""
        from safetensors.torch import load_model

        d = Path(pretrained_model_path)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise ValueError(f"{d} is not a saved AdvancedTransformer: expected config.json and model.safetensors "
                             "(written by save_pretrained)")
        config = json.loads((d / "config.json").read_text())
        if config.pop("model_type", None) != "omninet-advanced":
            raise ValueError(f"{d}/config.json is not an AdvancedTransformer config (model_type 'omninet-advanced'); "
                             "load an OmniNetModel directory with OmniNetModel.from_pretrained")
        pruned = {int(k): v for k, v in config.pop("pruned_heads", {}).items()}
        unknown = sorted(set(kwargs) - set(config))
        if unknown:
            raise ValueError(f"from_pretrained: unknown argument(s) {unknown}; valid overrides are {sorted(config)}")
        model = cls(**{**config, **kwargs})
        if pruned:
            model.prune_heads(pruned)
        device = next(model.parameters()).device
        load_model(model, str(d / "model.safetensors"), device=str(device))
        return model.eval()
