"""Backends: CPU for real; CUDA/ROCm/XPU/MPS/TPU/NPU detection and capability logic through
monkeypatched vendor modules (these check our decision logic, never measure a device)."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from omninet.hardware import (
    ACCELERATOR_RESOURCES,
    DEVICE_CONFIG_KEYS,
    DeviceConfig,
    available_backends,
    backends_for_resource,
    device_present,
    probe_capabilities,
    get_backend,
    resolve_backend,
    resolve_device_config,
    resolve_precision,
)
from omninet.hardware.cpu import ISA_LEVELS, cpu_flags
from omninet.hardware.probe import _LEVEL_OF

GiB = 2**30


# ---- CPU, for real ----------------------------------------------------------------------
def test_cpu_backend_is_real():
    cpu = get_backend("cpu")
    assert cpu.is_available() and cpu.device_count() == 1
    assert cpu.torch_device() == torch.device("cpu") and cpu.ray_resource == "CPU"
    assert torch.float32 in cpu.supported_dtypes()
    cpu.synchronize()
    stats = cpu.memory_stats()
    assert 0 < stats.in_use <= stats.peak and stats.in_use < stats.capacity
    assert 0 < stats.fraction < 1


_PEAK_CHILD = """
import torch
from omninet.hardware import get_backend
cpu = get_backend("cpu")
cpu.reset_peak_memory()
before = cpu.memory_stats()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
x.add_(1)
del x
after = cpu.memory_stats()
assert after.peak - before.in_use > 48 * 2**20, (before, after)  # the transient shows in the peak
cpu.reset_peak_memory()
assert cpu.memory_stats().peak < after.peak
print("ok")
"""


def test_cpu_peak_reset_tracks_a_real_allocation():
    # In a fresh interpreter: after hundreds of tests this process's heap can serve 64 MiB from
    # pages already resident, so the resident set (what the CPU backend reports) need not grow.
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_auto_picks_best_and_absent_devices_are_listed(monkeypatch):
    assert available_backends()[-1].name == "cpu"
    placement = resolve_device_config({"device": "auto"})
    assert placement.device.type == available_backends()[0].device_type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' is not available here; available: .*cpu \("):
        resolve_device_config({"device": "cuda"})
    with pytest.raises(ValueError, match="not a known backend"):
        resolve_backend("quantum")
    with pytest.raises(ValueError, match="export_onnx"):
        resolve_backend("lpu")
    with pytest.raises(ValueError, match="only 1 cpu device"):
        resolve_backend("cpu:3")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['devcie'\]"):
        resolve_device_config({"devcie": "cpu"})
    with pytest.raises(ValueError, match="memory_threshold"):
        resolve_device_config({"memory_threshold": 1.5})


# ---- CPU capability logic (flags monkeypatched) -------------------------------------------
def _cpu_flags(monkeypatch, **flags):
    monkeypatch.delenv("OMNINET_CPU_ISA", raising=False)  # these flags, not a level simulated for the whole run
    names = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
             "amx_fp16": "_is_amx_fp16_supported"}
    for flag, fn in names.items():
        monkeypatch.setattr(torch.cpu, fn, lambda v=flags.get(flag, False): v, raising=False)


@pytest.mark.parametrize("flags, auto, fp16_ok, bf16_ok", [
    (dict(avx2=True), "fp32", False, False),
    (dict(avx2=True, avx512=True), "fp32", False, True),  # bf16 allowed (oneDNN converts), not the default
    (dict(avx512=True, avx512_bf16=True), "bf16", False, True),
    (dict(avx512=True, amx_tile=True, avx512_bf16=True), "bf16", False, True),
    (dict(avx512=True, amx_tile=True, avx512_bf16=True, amx_fp16=True), "bf16", True, True),
])
def test_cpu_precision_decision_table(monkeypatch, flags, auto, fp16_ok, bf16_ok):
    _cpu_flags(monkeypatch, **flags)
    cpu = get_backend("cpu")
    assert resolve_precision("auto", cpu).name == auto
    if fp16_ok:
        assert resolve_precision("fp16", cpu).compute_dtype == torch.float16
    else:
        with pytest.raises(ValueError, match="AMX-FP16.*scalar kernels"):
            resolve_precision("fp16", cpu)
    if bf16_ok:
        assert resolve_precision("bf16", cpu).compute_dtype == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="bf16 is not supported on cpu"):
            resolve_precision("bf16", cpu)
    assert resolve_precision("int8", cpu).name == "int8"
    with pytest.raises(ValueError, match="inference"):
        resolve_precision("int8", cpu, training=True)


@pytest.mark.parametrize("level", list(ISA_LEVELS))
def test_omninet_cpu_isa_treats_this_cpu_as_a_lesser_one(monkeypatch, level):
    _cpu_flags(monkeypatch, avx2=True, avx512=True, avx512_vnni=True, avx512_bf16=True, amx_tile=True, amx_fp16=True)
    monkeypatch.setenv("OMNINET_CPU_ISA", level)
    assert {flag for flag, on in cpu_flags().items() if on} == set(ISA_LEVELS[level])
    caps = probe_capabilities("cpu")
    assert ("bf16" in caps["native_precisions"]) == (level in ("avx512_bf16", "amx"))
    assert all(_LEVEL_OF[flag] in ISA_LEVELS[level] for flag, on in caps["cpu_flags"].items() if on)  # /proc too


def test_omninet_cpu_isa_unknown_level_is_one_line(monkeypatch):
    monkeypatch.setenv("OMNINET_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match=r"^OMNINET_CPU_ISA='avx9' is not a CPU level; use one of avx2, avx512, "):
        cpu_flags()
    monkeypatch.setenv("OMNINET_CPU_ISA", "")  # empty is unset
    assert cpu_flags()["avx2"] == bool(torch.cpu._is_avx2_supported())


def test_mixed_needs_a_low_precision_dtype(monkeypatch):
    _cpu_flags(monkeypatch, avx2=True)
    with pytest.raises(ValueError, match="runs only fp32"):
        resolve_precision("mixed", get_backend("cpu"))


# ---- CUDA / ROCm (torch.cuda monkeypatched) -------------------------------------------------
def _fake_cuda(monkeypatch, *, capability=(8, 0), hip=None, bf16=True, count=2, name="NVIDIA A100-SXM4-80GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=0: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=0: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(total_memory=80 * GiB))
    monkeypatch.setattr(torch.version, "hip", hip)


@pytest.mark.parametrize("capability, auto, scaler, bf16", [
    ((9, 0), "bf16", False, True), ((8, 0), "bf16", False, True), ((7, 5), "fp16", True, False),
    ((7, 0), "fp16", True, False), ((6, 1), "fp32", False, False),
])
def test_cuda_decision_table(monkeypatch, capability, auto, scaler, bf16):
    _fake_cuda(monkeypatch, capability=capability)
    cuda = get_backend("cuda")
    assert cuda.is_available() and not get_backend("rocm").is_available()
    assert cuda.device_count() == 2 and cuda.ray_resource == "GPU"
    assert cuda.torch_device(1) == torch.device("cuda", 1)
    policy = resolve_precision("auto", cuda, training=True)
    assert (policy.name, policy.grad_scaler) == (auto, scaler)
    assert (torch.bfloat16 in cuda.supported_dtypes()) == bf16
    stats = cuda.memory_stats()
    assert (stats.in_use, stats.peak, stats.capacity) == (3 * GiB, 5 * GiB, 80 * GiB)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", cuda)
    assert available_backends()[0].name == "cuda"  # 'auto' prefers the GPU
    assert resolve_device_config({"device": "cuda:1", "precision": "auto"}).device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 cuda device"):
        resolve_backend("cuda:2")


@pytest.mark.parametrize("bf16, auto", [(True, "bf16"), (False, "fp16")])
def test_rocm_is_cuda_api_with_hip(monkeypatch, bf16, auto):
    _fake_cuda(monkeypatch, hip="6.2.0", bf16=bf16, name="AMD Instinct MI250X")
    rocm = get_backend("rocm")
    assert rocm.is_available() and not get_backend("cuda").is_available()
    assert rocm.torch_device() == torch.device("cuda", 0) and rocm.ray_resource == "GPU"
    assert resolve_precision("auto", rocm).name == auto
    assert resolve_backend("gpu")[0].name == "rocm"


# ---- XPU / MPS ------------------------------------------------------------------------------
def _fake_xpu(monkeypatch):
    fake = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_name=lambda i=0: "Intel Max 1550",
                           memory_allocated=lambda i=0: GiB, max_memory_allocated=lambda i=0: 2 * GiB,
                           get_device_properties=lambda i=0: SimpleNamespace(total_memory=64 * GiB),
                           reset_peak_memory_stats=lambda i=0: None, synchronize=lambda i=0: None)
    monkeypatch.setattr(torch, "xpu", fake, raising=False)


def test_xpu(monkeypatch):
    _fake_xpu(monkeypatch)
    xpu = get_backend("xpu")
    assert xpu.is_available() and xpu.ray_resource == "GPU" and xpu.default_precision() == "bf16"
    assert xpu.memory_stats().capacity == 64 * GiB
    assert available_backends()[0].name == "xpu"


def test_gpu_pool_is_present_on_an_xpu_node(monkeypatch):
    """Ray schedules Intel GPUs as 'GPU': the presence check must find the XPU, not look at
    torch.cuda only (which ran such trials 'simulated' on CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if not get_backend("xpu").is_available():
        assert device_present("GPU")[0] is False
    _fake_xpu(monkeypatch)
    assert device_present("GPU") == (True, "Intel Max 1550")
    assert [b.name for b in backends_for_resource("GPU")] == ["cuda", "rocm", "xpu"]


def test_accelerator_table_comes_from_the_backends():
    assert set(ACCELERATOR_RESOURCES) == {"GPU", "TPU", "NPU"}
    assert device_present(None) == (True, "cpu")
    assert device_present("CPU")[0] is True
    ok, why = device_present("FPGA")
    assert not ok and "unknown accelerator 'FPGA'" in why and "GPU" in why
    if not get_backend("tpu").is_available():
        ok, why = device_present("TPU")
        assert not ok and "tpu" in why and "\n" not in why


def test_device_config_is_typed_and_keeps_the_dict_wording():
    assert DEVICE_CONFIG_KEYS == ("device", "precision", "memory_threshold")
    assert DeviceConfig() == DeviceConfig.from_dict({}) == DeviceConfig(device="auto", precision="fp32", memory_threshold=None)
    cfg = DeviceConfig.from_dict({"device": "cpu", "memory_threshold": 1})
    assert cfg.memory_threshold == 1.0 and isinstance(cfg.memory_threshold, float)
    assert resolve_device_config(cfg).device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device_config: unknown key\(s\) \['devcie'\]; valid keys are \['device', "):
        DeviceConfig.from_dict({"devcie": "cpu"})
    with pytest.raises(ValueError, match=r"device_config\['memory_threshold'\] must be a fraction in \(0, 1\], got True"):
        DeviceConfig(memory_threshold=True)
    with pytest.raises(ValueError, match=r"device_config\['precision'\]='fp8'; use one of"):
        resolve_device_config({"precision": "fp8"})
    with pytest.raises(TypeError):
        DeviceConfig("cpu")  # keyword-only

    import dataclasses

    @dataclasses.dataclass(kw_only=True)
    class Hardware(DeviceConfig):  # how the trial's hardware section extends it
        num_threads: int | None = None

        def validate(self) -> None:
            super().validate()
            if self.num_threads is not None and self.num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    hw = Hardware.from_dict({"device": "cpu", "num_threads": 2})
    assert resolve_device_config(hw).device == torch.device("cpu")
    with pytest.raises(ValueError, match="num_threads"):
        Hardware(num_threads=0)


def test_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: GiB)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * GiB)
    mps = get_backend("mps")
    assert mps.is_available() and mps.torch_device() == torch.device("mps")
    policy = resolve_precision("auto", mps, training=True)
    assert (policy.name, policy.grad_scaler) == ("fp16", True)
    assert mps.memory_stats().fraction == pytest.approx(1 / 16)


# ---- TPU / NPU: fake vendor packages, imported lazily ------------------------------------
def _fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_vendor_modules_are_not_imported_eagerly():
    import omninet.hardware  # noqa: F401

    assert "torch_xla" not in sys.modules and "torch_npu" not in sys.modules
    assert not get_backend("tpu").is_available() and not get_backend("npu").is_available()


def test_tpu(monkeypatch):
    _fake_module(monkeypatch, "torch_xla")
    _fake_module(monkeypatch, "torch_xla.runtime", device_type=lambda: "TPU", addressable_device_count=lambda: 4)
    _fake_module(monkeypatch, "torch_xla.core")
    _fake_module(monkeypatch, "torch_xla.core.xla_model", wait_device_ops=lambda: None,
                 get_memory_info=lambda d: {"bytes_used": 2 * GiB, "bytes_limit": 16 * GiB})
    tpu = get_backend("tpu")
    assert tpu.is_available() and tpu.device_count() == 4 and tpu.ray_resource == "TPU"
    assert tpu.torch_device(0).type == "xla"
    assert resolve_precision("auto", tpu).name == "bf16"
    with pytest.raises(ValueError, match="fp16 is not supported on tpu"):
        resolve_precision("fp16", tpu)
    assert tpu.memory_stats().fraction == pytest.approx(2 / 16)
    assert available_backends()[0].name in ("tpu", "npu")
    assert resolve_backend("xla")[0].name == "tpu"


@pytest.mark.parametrize("bf16, auto", [(True, "bf16"), (False, "fp16")])
def test_npu(monkeypatch, bf16, auto):
    _fake_module(monkeypatch, "torch_npu")
    fake = SimpleNamespace(is_available=lambda: True, device_count=lambda: 8, get_device_name=lambda i=0: "Ascend910B",
                           is_bf16_supported=lambda: bf16, memory_allocated=lambda i=0: GiB,
                           max_memory_allocated=lambda i=0: GiB, reset_peak_memory_stats=lambda i=0: None,
                           get_device_properties=lambda i=0: SimpleNamespace(total_memory=64 * GiB))
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    npu = get_backend("npu")
    assert npu.is_available() and npu.device_count() == 8 and npu.ray_resource == "NPU"
    policy = resolve_precision("auto", npu, training=True)
    assert (policy.name, policy.grad_scaler) == (auto, not bf16)


# ---- capability probe (what the sweep prunes its search space with) ------------------------
def _agrees_with_the_trial(caps: dict, device: str) -> None:
    backend = resolve_backend(device)[0]
    for name in ("fp32", "bf16", "fp16", "mixed"):
        try:
            resolve_precision(name, backend, training=True)
            assert name not in caps["refused"], name
        except ValueError as exc:
            assert caps["refused"][name] == str(exc) and name not in caps["native_precisions"]


def test_probe_on_this_cpu():
    import json

    caps = probe_capabilities("cpu")
    assert json.loads(json.dumps(caps)) == caps  # JSON-able
    assert caps["backend"] == "cpu" and caps["device"] == "cpu" and caps["torch"] == torch.__version__
    assert "fp32" in caps["native_precisions"] and caps["memory_capacity_mb"] > 0
    assert ("int8" in caps["native_precisions"]) == (caps["int8_engine"] is not None)
    assert ("mixed" in caps["native_precisions"]) == bool({"bf16", "fp16"} & set(caps["native_precisions"]))
    assert ("bf16" in caps["native_precisions"]) == get_backend("cpu").native_bf16()
    assert set(caps["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16"}
    assert all("\n" not in why for why in caps["refused"].values())
    _agrees_with_the_trial(caps, "cpu")


INT8 = ["int8", "int8_token", "int8_weight", "qat_int8"]


@pytest.mark.parametrize("flags, native, int8_engine", [
    (dict(avx2=True), ["fp32", *INT8], "torch.ao"),  # 7-bit activations: fbgemm's AVX2 sums are int16
    (dict(avx2=True, avx512=True), ["fp32", *INT8], "torch.ao"),  # bf16 runs (converted), but is not native
    (dict(avx512=True, avx512_vnni=True, avx512_bf16=True), ["fp32", "bf16", "mixed", *INT8], "torch.ao-vnni"),
    (dict(avx512=True, amx_tile=True, avx512_bf16=True, amx_fp16=True),
     ["fp32", "bf16", "fp16", "mixed", *INT8], "torch.ao-vnni"),
])
def test_probe_follows_the_cpu_flags(monkeypatch, flags, native, int8_engine):
    _cpu_flags(monkeypatch, **flags)
    caps = probe_capabilities("cpu")
    native = [n for n in native if n not in INT8 or caps["int8_engines"].get("int8" if n == "qat_int8" else n)]
    assert caps["native_precisions"] == native
    assert caps["int8_engines"].get("int8", int8_engine) == int8_engine == (caps["int8_engine"] or int8_engine)
    if "fp16" not in native:
        assert "AMX-FP16" in caps["refused"]["fp16"]
    _agrees_with_the_trial(caps, "cpu")


def test_probe_on_a_faked_gpu(monkeypatch):
    _fake_cuda(monkeypatch, capability=(7, 5), bf16=False, name="Tesla T4")
    caps = probe_capabilities("auto")
    assert (caps["backend"], caps["device"], caps["device_name"]) == ("cuda", "cuda:0", "Tesla T4")
    assert caps["native_precisions"] == ["fp32", "fp16", "mixed"] and caps["int8_engine"] is None
    assert "CPU only" in caps["refused"]["int8"] and "bf16" in caps["refused"]
    assert caps["memory_capacity_mb"] == 80 * 1024
    _agrees_with_the_trial(caps, "cuda")
