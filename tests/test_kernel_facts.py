"""Kernels answer for themselves: each ``KernelSpec`` says what a layer computes at a length
(``attention_work``: the path it runs, keys per query, projection work) and its rules for a
searched parameter (``search_space``); the cost model and the sweep ask the kernel instead of
re-deriving cutovers and ranks. Kernel modules import the registry, not the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from omninet.attention.registry import KERNELS, AttentionWork, fit_search_param, get_kernel
from omninet.config import ModelConfig
from omninet.trial import TrialConfig
from omninet.trial.cost import cost_features

ATTENTION_DIR = Path(__file__).resolve().parents[1] / "omninet" / "attention"


def model(kernel: str, n: int = 2048, *, arch: str = "encoder", layers: int = 4, **attention) -> ModelConfig:
    extra = {} if arch == "encoder" else {"position": {"kind": "rotary"}}
    return ModelConfig.from_dict({"hidden_size": 64, "num_layers": layers, "num_heads": 4, "max_seq_length": n,
                                  "arch": arch, "vocab_size": 32, "attention": {"kernel": kernel, **attention},
                                  **extra})


def trial(kernel: str, n: int, **attention) -> TrialConfig:
    return TrialConfig.from_dict({
        "task": {"name": "listops", "preset": "quickstart"},
        "model": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "max_seq_length": n,
                  "attention": {"kernel": kernel, **attention}},
        "train": {"steps": 10}, "hardware": {"precision": "fp32"},
        "measure": {"seq_length": n, "allow_other_length": True}})


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("n", [64, 2048])
def test_every_kernel_states_its_work_for_every_layer(name, n) -> None:
    config = model(name, n)
    for i in range(config.num_layers):
        w = get_kernel(name).attention_work(config, n, layer_idx=i)
        assert isinstance(w, AttentionWork) and w.kernel in KERNELS
        assert 0 < w.keys <= n and w.projection >= 0


@pytest.mark.parametrize("arch, n, blocks", [("encoder", 2000, {"random_blocks": 2, "min_seq_length": 256}),
                                             ("encoder", 4096, {}),
                                             ("decoder", 1000, {"block_size": 64, "min_seq_length": 128})])
def test_block_sparse_keys_are_the_layouts_own_pairs(arch, n, blocks) -> None:
    config = model("block_sparse", n, arch=arch, block_sparse=blocks)
    spec = get_kernel("block_sparse")
    for i in range(config.num_layers):
        w = spec.attention_work(config, n, layer_idx=i)
        mask = spec.make_state(config, i, False).dense_mask(n, n)  # the pairs the kernel computes
        assert w.kernel == "block_sparse" and w.projection == 0.0
        assert w.keys == pytest.approx(int(mask.count_nonzero()) / n, rel=1e-12)
    short = model("block_sparse", 512)
    assert spec.attention_work(short, 512, layer_idx=0) == AttentionWork("sdpa", 512.0)  # below the cutover


def test_linformer_work_is_its_rank_and_projections() -> None:
    spec = get_kernel("linformer")
    fixed = model("linformer", 2048, linformer={"k": 256})
    adaptive = model("linformer", 2048, linformer={"k": 1024, "adaptive": True, "compression": 4})
    assert spec.attention_work(fixed, 2048, layer_idx=0) == AttentionWork("linformer", 256.0, 2.0 * 256 * 2048 * 64)
    assert spec.attention_work(adaptive, 2048, layer_idx=0).keys == 512  # ceil(2048 / 4)
    assert spec.attention_work(fixed, 1024, layer_idx=0) == AttentionWork("sdpa", 1024.0)  # at min_seq_length
    some = model("linformer", 2048, linformer={"layers": [1]})
    assert [spec.attention_work(some, 2048, layer_idx=i).kernel for i in range(4)] == ["sdpa", "linformer", "sdpa",
                                                                                       "sdpa"]


def test_hybrid_work_is_linformer_on_its_layers_and_block_sparse_on_the_others() -> None:
    config = model("hybrid", 2048)
    works = [get_kernel("hybrid").attention_work(config, 2048, layer_idx=i) for i in range(4)]
    assert [w.kernel for w in works] == ["block_sparse", "linformer", "block_sparse", "linformer"]
    assert works[0] == get_kernel("block_sparse").attention_work(config, 2048, layer_idx=0)
    assert works[1] == get_kernel("linformer").attention_work(model("linformer", 2048), 2048, layer_idx=1)
    for i in range(4):  # its memory estimate takes the same path
        mem = get_kernel("hybrid").estimate(config, 1, 2048, 4, layer_idx=i)
        assert mem == get_kernel(works[i].kernel).estimate(model(works[i].kernel, 2048), 1, 2048, 4, layer_idx=i)


def test_hybrid_cost_features_follow_hybrids_compute_not_dense() -> None:
    n, hd = 2048, 16
    hybrid, dense = cost_features(trial("hybrid", n)), cost_features(trial("sdpa", n))
    lat, dense_lat = hybrid["latency_p50_ms"], dense["latency_p50_ms"]
    works = [get_kernel("hybrid").attention_work(trial("hybrid", n).model_config, n, layer_idx=i) for i in range(4)]
    assert "attn|sdpa|fp32" not in lat and "attn|hybrid|fp32" not in lat
    assert lat["attn|linformer|fp32"] == pytest.approx(2 * 4 * n * works[1].keys * hd)  # layers 1, 3: n x k per head
    assert lat["attn|block_sparse|fp32"] == pytest.approx(2 * 4 * n * works[0].keys * hd)  # layers 0, 2
    assert lat["attn"] < dense_lat["attn"] / 4  # O(N k) and the layout's density, not O(N^2)
    assert lat["lowrank|fp32"] == pytest.approx(2 * 2.0 * works[1].keys * n * 64) and dense_lat["lowrank|fp32"] == 0
    assert lat["calls|linformer"] == lat["calls|block_sparse"] == 2 * 4
    for key in ("proj|fp32", "ff|fp32"):  # the projections and feed-forward do not depend on the kernel
        assert lat[key] == dense_lat[key]
    infer = hybrid["peak_memory_infer_mb"]
    b = trial("hybrid", n).measure_batch_size
    assert infer["scores"] == pytest.approx(sum(b * 4 * n * w.keys * 4 for w in works) / 2**20)  # fp32, per layer
    assert "parameters|hybrid|fp32" in infer  # the model-wide memory of a mixed model is hybrid's own
    # at or below both cutovers hybrid runs dense SDPA in every layer and is costed as that (its memory
    # still holds the Linformer projections it carries)
    short = cost_features(trial("hybrid", 512))
    assert short["latency_p50_ms"] == cost_features(trial("sdpa", 512))["latency_p50_ms"]
    assert "parameters|sdpa|fp32" in short["peak_memory_infer_mb"]


def test_cost_features_of_the_other_kernels_are_what_they_compute() -> None:
    n, hd = 2048, 16
    sparse = trial("block_sparse", n)
    density = float(get_kernel("block_sparse").make_state(sparse.model_config, 0, False).dense_mask(n, n).float().mean())
    assert cost_features(sparse)["latency_p50_ms"]["attn|block_sparse|fp32"] == pytest.approx(4 * 4 * n * density * n * hd)
    lin = cost_features(trial("linformer", n))["latency_p50_ms"]
    assert lin["attn|linformer|fp32"] == pytest.approx(4 * 4 * n * 256 * hd)
    assert lin["lowrank|fp32"] == pytest.approx(4 * 2.0 * 256 * n * 64)
    for name in ("sdpa", "eager"):
        feats = cost_features(trial(name, n))["latency_p50_ms"]
        assert feats[f"attn|{name}|fp32"] == pytest.approx(4 * 4 * n * n * hd) and feats["lowrank|fp32"] == 0
    assert "attn|sdpa|fp32" in cost_features(trial("block_sparse", 512))["latency_p50_ms"]  # below its cutover


def test_linformer_rank_range_is_clipped_to_the_measured_length_by_the_kernel() -> None:
    import dataclasses

    from omninet.sweep.config import ParamSpec

    param = ParamSpec(path="model.attention.linformer.k", low=8, high=512, log=True)
    clipped, notes = fit_search_param(param, 128)
    assert clipped == dataclasses.replace(param, high=128)
    assert notes == ["clipped model.attention.linformer.k high 512 -> 128 (the measured length)"]
    assert fit_search_param(param, 1024) == (param, [])
    other = ParamSpec(path="model.hidden_size", low=8, high=512)
    assert fit_search_param(other, 128) == (other, [])
    choices = ParamSpec(path="model.attention.linformer.k", choices=[64, 512])
    assert fit_search_param(choices, 128) == (choices, [])
    with pytest.raises(ValueError, match="is above the measured length 128"):
        fit_search_param(ParamSpec(path="model.attention.linformer.k", low=256, high=512), 128)


def test_kernel_modules_import_the_registry_not_the_package() -> None:
    for path in sorted(ATTENTION_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        upward = [node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module == "omninet.attention"
                  or isinstance(node, ast.Import) and any(a.name == "omninet.attention" for a in node.names)]
        assert not upward, f"{path.name}:{upward} imports the package omninet.attention; import its modules"



def test_the_sweep_applies_the_kernels_rule_to_each_pools_space(tmp_path) -> None:
    from omninet.sweep import SweepConfigError, SweepController
    from omninet.sweep.cluster import space_for

    def space(low: int) -> list:
        ctl = SweepController({
            "name": "space", "results_dir": str(tmp_path / f"space{low}"),
            "trial": {"task": {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 64,
                               "num_eval": 16},
                      "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}, "train": {"steps": 2},
                      "measure": {"seq_length": 128, "allow_other_length": True}},
            "search_space": {"model.attention.kernel": {"choices": ["sdpa", "linformer"]},
                             "model.attention.linformer.k": {"low": low, "high": 512, "log": True,
                                                             "when": {"model.attention.kernel": "linformer"}}},
            "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1}]})
        info: dict = {}
        return space_for(ctl.config, ctl.config.pool("cpu"), info), info

    params, info = space(8)
    assert {p.path: p for p in params}["model.attention.linformer.k"].high == 128
    assert info["search_space_notes"] == ["clipped model.attention.linformer.k high 512 -> 128 (the measured length)"]
    with pytest.raises(SweepConfigError, match=r"search_space\.model\.attention\.linformer\.k: low 256.* above the measured"):
        space(256)
