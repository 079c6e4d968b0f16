"""Hugging Face folders in and out, with safetensors alone (transformers is never imported).

``load_hf(OmniNetModel, path)`` (what ``OmniNetModel.from_hf`` calls) reads config.json and
``*.safetensors`` (sharded or not), picks the family map by ``model_type``, builds the model with its parameters on the meta device and assigns
the checkpoint's tensors (converted once to ``dtype``), so an import holds one copy of the
weights. ``save_hf(model, path)`` writes the family's config.json and tensors back; pruned heads
go back as zero rows of q and zero columns of o_proj in the family's dense shape, which
transformers loads and which gives the pruned model's outputs exactly (but none of its speed).

Every refusal is one ValueError line that names the key or tensor at fault.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from omninet.config import ModelConfig
from omninet.interop import bert, gpt2, llama
from omninet.interop.base import Family, refuse
from omninet.interop.gguf import read_gguf, read_gguf_config  # the gguf library itself is imported there on use

__all__ = ["FAMILIES", "load_hf", "load_gguf", "save_hf", "read_hf_config", "foreign_config", "family_of",
           "copy_tokenizer_files", "TOKENIZER_FILES"]

log = logging.getLogger("omninet.interop")

FAMILIES: tuple[Family, ...] = (gpt2.FAMILY, llama.FAMILY, bert.FAMILY)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja")
DENSE_KERNELS = ("sdpa", "eager")
_PREFIXES = ("transformer.", "model.", "bert.", "roberta.")


def read_hf_config(path) -> dict:
    d = Path(path)
    if not (d / "config.json").is_file():
        refuse(f"{d}: no config.json; pass a Hugging Face model folder (config.json + *.safetensors)")
    hf = json.loads((d / "config.json").read_text())
    if hf.get("auto_map"):
        refuse(f"{d}/config.json: auto_map names remote code, which OmniNet never runs; "
               f"it imports the built-in families {', '.join(sorted(_BY_TYPE))}")
    if hf.get("model_type") not in _BY_TYPE:
        refuse(f"{d}/config.json: model_type {hf.get('model_type')!r} is not supported; "
               f"OmniNet imports {', '.join(sorted(_BY_TYPE))}")
    return hf


def foreign_config(path) -> ModelConfig:
    """The ModelConfig an import of ``path`` (HF folder or .gguf file) would build, read from its
    config alone (no weights): what a sweep checks its trials against before converting."""
    p = Path(path)
    if p.suffix == ".gguf":
        hf = read_gguf_config(p)
        if hf.get("model_type") not in _BY_TYPE:
            refuse(f"{p}: GGUF architecture {hf.get('model_type')!r} is not supported; "
                   f"OmniNet imports {', '.join(sorted(_BY_TYPE))}")
    else:
        hf = read_hf_config(p)
    return _BY_TYPE[hf["model_type"]].to_config(hf)


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else files
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse(f"{d}: only pickle weight files ({', '.join(pickles)}), which OmniNet never unpickles; "
               "re-save them as safetensors (model.save_pretrained(dir, safe_serialization=True))")
    refuse(f"{d}: no *.safetensors weight file")


class _Checkpoint:
    """A checkpoint's tensors by name, each read when asked for: from safetensors shards
    (``from_files``) or from tensors already in memory (a GGUF file's, dequantized)."""

    def __init__(self, read: dict):
        self.where = read  # name -> callable giving the tensor
        self.used: set[str] = set()

    @classmethod
    def from_files(cls, files: list[Path]) -> "_Checkpoint":
        where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:  # the library parses and checks the header
                names = list(h.keys())
            header = _header(f)
            where.update({n: (lambda f=f, e=header[n]: _read_tensor(f, e)) for n in names})
        return cls(where)

    def resolve(self, name: str) -> str | None:
        candidates = [name] + [name[len(p):] for p in _PREFIXES if name.startswith(p)]
        candidates += [c.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                       for c in candidates if "LayerNorm." in c]  # the first BERT checkpoints' names
        return next((c for c in candidates if c in self.where), None)

    def get(self, name: str) -> torch.Tensor:
        found = self.resolve(name)
        if found is None:
            refuse(f"checkpoint has no tensor {name!r} that its config.json implies")
        self.used.add(found)
        return self.where[found]()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: {**entry, "start": 8 + n} for name, entry in header.items()}


def _read_tensor(file: Path, entry: dict) -> torch.Tensor:
    """One tensor read from its byte range straight into its own storage. safetensors'
    ``safe_open`` maps the whole file, and the mapped pages it reads stay in the process's RSS
    while the handle is open: with every tensor copied out of them, an import held the
    checkpoint twice (peak RSS growth 1.75x its size, measured). Plain reads hold it once."""
    if entry["dtype"] not in _DTYPES:
        refuse(f"{file}: tensor dtype {entry['dtype']} is not supported; OmniNet reads {', '.join(_DTYPES)}")
    begin, end = entry["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(entry["start"] + begin)
        if f.readinto(raw.numpy()) != end - begin:
            refuse(f"{file} is truncated: tensor data ends before its header says")
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory, no random init); buffers (rotary
    frequencies, head ids) are built as usual. The same trick as accelerate's
    ``init_empty_weights(include_buffers=False)``, which is not a dependency here."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_hf(model_cls, path, *, dtype: torch.dtype = torch.float32, max_seq_length: int | None = None):
    """A ``model_cls`` (``OmniNetModel``; passed in, as this module sits below the model) with
    the weights of the HF folder ``path``, in eval mode on CPU. ``max_seq_length`` caps the
    model's length (default: the checkpoint's)."""
    d = Path(path)
    if d.suffix == ".gguf":
        return load_gguf(model_cls, d, dtype=dtype, max_seq_length=max_seq_length)
    hf = read_hf_config(d)
    return _build(model_cls, hf, _Checkpoint.from_files(_weight_files(d)), d, dtype=dtype, max_seq_length=max_seq_length)


def load_gguf(model_cls, path, *, dtype: torch.dtype = torch.float32, max_seq_length: int | None = None):
    """An ``OmniNetModel`` from a GGUF file (llama.cpp's format), dequantized by the ``gguf``
    library into the Hugging Face names and layout of its family (``omninet.interop.gguf``)."""
    ck = read_gguf(path)
    if ck.config.get("model_type") not in _BY_TYPE:
        refuse(f"{path}: GGUF architecture {ck.config.get('model_type')!r} is not supported; "
               f"OmniNet imports {', '.join(sorted(_BY_TYPE))}")
    tensors = ck.tensors
    model = _build(model_cls, ck.config, _Checkpoint({n: (lambda n=n: tensors.pop(n)) for n in list(tensors)}), Path(path),
                   dtype=dtype, max_seq_length=max_seq_length)
    model.gguf_tokenizer = ck.tokenizer
    model.source_dir = None  # no tokenizer files beside a GGUF file: its vocabulary is gguf_tokenizer
    return model


def _build(model_cls, hf: dict, ckpt: _Checkpoint, d: Path, *, dtype, max_seq_length):
    family = _BY_TYPE[hf["model_type"]]
    config = family.to_config(hf, **({"max_seq_length": max_seq_length} if max_seq_length else {}))
    with _parameters_on_meta():
        model = model_cls(config)
    expected = model.state_dict()
    state = {}
    for rule in family.rules(config, hf):
        t = rule.gather(ckpt.get)
        want = tuple(expected[rule.ours].shape)
        if tuple(t.shape) != want:
            refuse(f"checkpoint tensor {rule.theirs[0]!r} has shape {list(t.shape)} but its config.json implies "
                   f"{list(want)} (for {rule.ours})")
        state[rule.ours] = t.to(dtype)
    tied = config.tie_embeddings and model.lm_head is not None
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    if missing:  # a family table that does not cover the model: a bug here, not the user's
        raise RuntimeError(f"{family.name} map leaves OmniNet tensors unset: {missing}")
    unused = sorted(n for n in set(ckpt.where) - ckpt.used if not n.endswith(family.ignored))
    if unused:
        log.warning("import %s: %d checkpoint tensors have no place in the model and are left out: %s",
                    d, len(unused), ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left on the meta device after import: {left}")
    model.source_dir = d
    return model.eval()


def family_of(config: ModelConfig) -> Family:
    fam = next((f for f in FAMILIES if f.owns(config)), None)
    if fam is None:
        refuse("no Hugging Face family expresses this model's block options (norm, MLP, biases, positions, heads); "
               "keep it as an OmniNet folder (save_pretrained) or export it to ONNX (export_onnx)")
    return fam


def _exportable(model) -> None:
    cfg = model.config
    if cfg.attention.kernel not in DENSE_KERNELS:
        refuse(f"attention kernel {cfg.attention.kernel!r} has no Hugging Face form (it computes other outputs than "
               "dense attention); keep it as an OmniNet folder (save_pretrained) or export it to ONNX (export_onnx)")
    if cfg.heads.active_heads is not None:
        refuse("per-input head gating (heads.active_heads) has no Hugging Face form; keep it as an OmniNet folder "
               "(save_pretrained) or export it to ONNX (export_onnx)")
    odd = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torch.ao")
                  or "Quantized" in type(m).__name__ or "Int8" in type(m).__name__}
                 | {type(p.data).__name__ for p in model.parameters() if type(p.data) is not torch.Tensor})  # torchao
    if odd:
        refuse(f"quantized modules ({', '.join(odd)}) have no Hugging Face form; keep the model as an OmniNet folder "
               "(save_pretrained) or export it to ONNX (export_onnx)")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        refuse(f"parameters in several dtypes ({', '.join(sorted(map(str, dtypes)))}, layer-wise mixed precision) "
               "have no Hugging Face form; cast the model to one dtype first or keep it as an OmniNet folder")


def _dense_state(model) -> dict[str, torch.Tensor]:
    """The state dict with every pruned head back in place as zeros, in the unpruned shapes."""
    cfg = model.config
    state = dict(model.state_dict())
    H, Hk, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    stacks = [(n, s) for n, s in (("encoder", model.encoder), ("decoder", model.decoder)) if s is not None]
    for stack_name, stack in stacks:
        for i, block in enumerate(stack.blocks):
            attn = block.attn
            if attn.num_heads == H and attn.num_kv_heads == Hk:
                continue
            rows = lambda ids, start: (start + ids[:, None] * D + torch.arange(D)).reshape(-1)  # noqa: E731
            q, kv = attn.head_ids.cpu(), attn.kv_ids.cpu()
            where = torch.cat([rows(q, 0), rows(kv, H * D), rows(kv, (H + Hk) * D)])
            p = f"{stack_name}.blocks.{i}.attn"
            for w in ("weight", "bias"):
                t = state.get(f"{p}.qkv.{w}")
                if t is not None:
                    state[f"{p}.qkv.{w}"] = t.new_zeros((H + 2 * Hk) * D, *t.shape[1:]).index_copy(0, where, t)
            o = state[f"{p}.o_proj.weight"]
            state[f"{p}.o_proj.weight"] = o.new_zeros(o.shape[0], H * D).index_copy(1, rows(q, 0), o)
    return state


def save_hf(model, path, *, tokenizer_from=None) -> Path:
    """Writes ``model`` as a Hugging Face folder that transformers loads with the same logits
    (config.json, model.safetensors, the tokenizer files of ``tokenizer_from`` or of the
    folder the model came from). Refuses what HF cannot express, naming the way out."""
    _exportable(model)
    cfg = model.config
    family = family_of(cfg)
    hf_config = family.to_hf_config(cfg)
    state = _dense_state(model)
    H, Hk, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    out = {}
    for rule in family.rules(cfg, hf_config):
        t = state[rule.ours].detach().cpu()
        sizes = [H * D, Hk * D, Hk * D] if len(rule.theirs) == 3 else [t.shape[0]]
        out.update(rule.split(t, sizes))
    dtype = next(model.parameters()).dtype
    hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config, indent=2))
    source = tokenizer_from if tokenizer_from is not None else getattr(model, "source_dir", None)
    if source is not None:
        copy_tokenizer_files(source, d)
    return d


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copies the tokenizer (and generation) files of folder ``src`` into ``dst``; returns their names."""
    s, d = Path(src), Path(dst)
    if s.is_file():
        s = s.parent
    names = [n for n in TOKENIZER_FILES if (s / n).is_file() and s.resolve() != d.resolve()]
    for n in names:
        shutil.copyfile(s / n, d / n)
    return names
