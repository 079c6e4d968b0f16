"""``omninet import-hf SRC DST`` and ``omninet export-hf SRC DST``: a pretrained checkpoint in
as an OmniNet folder, and an OmniNet folder (a tuned winner) out as a Hugging Face folder. Bad
input: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from omninet.interop.convert import import_checkpoint
from omninet.model import OmniNetModel

__all__ = ["import_main", "export_main"]

DTYPES = ("float32", "bfloat16", "float16")


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="omninet import-hf", description="Convert a Hugging Face folder (config.json + *.safetensors) or a GGUF "
        "file into an OmniNet folder (save_pretrained), with its tokenizer files.")
    parser.add_argument("src", help="a Hugging Face model folder or a .gguf file")
    parser.add_argument("dst", help="the OmniNet folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    _free(args.dst)
    started = time.perf_counter()
    out = import_checkpoint(Path(args.src).expanduser(), Path(args.dst).expanduser(), dtype=getattr(torch, args.dtype))
    print(json.dumps({"imported": str(args.src), "into": str(out), "seconds": round(time.perf_counter() - started, 2)}))
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="omninet export-hf", description="Write an OmniNet folder (save_pretrained, a kept trial model or a "
        "recommendation) as a Hugging Face folder that transformers loads with the same logits; dense kernels only.")
    parser.add_argument("src", help="an OmniNet model folder (config.json + model.safetensors)")
    parser.add_argument("dst", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights first (default: as saved)")
    args = parser.parse_args(argv)
    _free(args.dst)
    model = OmniNetModel.from_pretrained(Path(args.src).expanduser())
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    out = model.save_hf(Path(args.dst).expanduser())
    print(json.dumps({"exported": str(args.src), "into": str(out)}))
    return 0


def _free(dst: str) -> None:
    d = Path(dst).expanduser()
    if d.exists() and any(d.iterdir()):
        raise ValueError(f"{d} exists and is not empty; give a new folder")
