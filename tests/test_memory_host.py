"""Host memory of a run (exact-size page-locked buffers, the RAM check, host failures reported as
such) and the attention-kernel probe's rule; CUDA's register call is the only thing replaced."""

import gc

import pytest
import torch

from dreamrelation_core.errors import HostMemoryError
from dreamrelation_core.mochi import fp8
from dreamrelation_core.mochi.tiny import tiny_transformer
from dreamrelation_core.training.memory import host
from dreamrelation_core.training.memory.attention import choose_kernel
from dreamrelation_core.training.memory.estimate import GIB, MochiDims, host_estimate
from dreamrelation_core.training.memory.setup import MemoryOptions
from dreamrelation_core.training.memory.swap import BlockSwap
from dreamrelation_core.training.worker import describe_failure, is_out_of_memory


@pytest.fixture
def cuda_register(monkeypatch):
    """cudaHostRegister / cudaHostUnregister recorded (no CUDA here): (ptr, bytes) and ptrs."""
    calls = {"register": [], "unregister": [], "fail": 0}

    def register(ptr, nbytes):
        calls["register"].append((ptr, nbytes))
        return calls["fail"]

    monkeypatch.setattr(host, "_cuda_register", register)
    monkeypatch.setattr(host, "_cuda_unregister", lambda ptr: calls["unregister"].append(ptr))
    return calls


def test_swap_store_pins_exactly_each_blocks_bytes(cuda_register):
    model = fp8.freeze_linears(tiny_transformer(num_layers=3), torch.float8_e4m3fn)
    expected = [sum(m.weight.numel() for _, m in fp8.frozen_linears(b)) for b in model.transformer_blocks]
    swap = BlockSwap(model, 3, "cpu", pin_memory=True)
    sizes = [n for _, n in cuda_register["register"]]
    assert all(ptr % 4096 == 0 for ptr, _ in cuda_register["register"])  # whole pages registered
    assert sizes == [swap.layouts[i].nbytes for i in range(3)] == [swap.store[i].numel() for i in range(3)]
    # fp8: one byte per weight, each weight view aligned to 256 bytes: no power-of-two rounding
    assert all(e <= n < e + 256 * 16 for e, n in zip(expected, sizes))
    assert swap.store_bytes == sum(sizes)
    # the estimate of the store (for the RAM check) is the same arithmetic at Mochi's size
    ptrs = [p for p, _ in cuda_register["register"]]
    swap.remove()  # the model's hooks hold the swap
    del swap
    gc.collect()
    assert sorted(cuda_register["unregister"]) == sorted(ptrs)  # registration ends with the memory
    t = host.pinned_empty(4096)
    ptr, view = t.data_ptr(), t[:16]
    del t
    gc.collect()
    assert ptr not in cuda_register["unregister"]  # a view still uses the memory
    del view
    gc.collect()
    assert cuda_register["unregister"][-1] == ptr


def test_pinning_failure_is_a_host_memory_error(cuda_register):
    cuda_register["fail"] = 2  # cudaErrorMemoryAllocation
    with pytest.raises(HostMemoryError) as info:
        host.pinned_empty(1 << 20, "block swap's weight store")
    msg = describe_failure(info.value)
    assert not is_out_of_memory(info.value)  # not reported as a GPU out-of-memory ...
    assert "host memory (RAM)" in msg and "block swap's weight store" in msg and "out of GPU memory" not in msg
    assert "swap fewer" in msg  # ... and its advice goes the other way


def test_cpu_allocator_failure_is_reported_as_host_memory():
    e = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: "
                     "you tried to allocate 10737418240 bytes.")
    msg = describe_failure(e)
    assert msg.startswith("not enough host memory (RAM)") and "DefaultCPUAllocator" in msg
    assert describe_failure(MemoryError()).startswith("not enough host memory (RAM)")


def test_ram_check_before_start():
    need = 5 * GIB
    with pytest.raises(HostMemoryError, match=r"need 5\.00 GiB .* but 6\.00 GiB are available"):
        host.check_host_memory(need, "the swap store", available=6 * GIB)  # 2 GiB are kept free
    assert "of 8.00 GiB available" in host.check_host_memory(need, "the swap store", available=8 * GIB)
    assert "not checked" in host.check_host_memory(need, "the swap store", available_fn=lambda: None)
    text = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   16000000 kB\n"
    assert host.parse_meminfo(text) == 16000000 * 1024
    assert host.parse_meminfo("MemFree: 10 kB\nCached: 5 kB\n") == 15 * 1024
    if host.available_ram() is not None:  # this machine's figure is a plausible number of bytes
        assert 0 < host.available_ram() < 1 << 50
    # what the trainer checks: the pinned parts of the host estimate, Mochi at 61 frames
    est = host_estimate((11, 60, 106), MemoryOptions("fp8", 48, True, True))
    blocks = sum(sum(i * o for _, i, o, _ in MochiDims().block_linears(b)) for b in range(48))
    assert blocks <= est.parts["swap_store"] < blocks + 48 * 20 * 256
    assert est.parts["offload"] == 48 * (17490 * 2 * 3072 + 256 * 2 * 1536)  # 4.8 GiB of bf16 inputs
    with pytest.raises(HostMemoryError, match="the store"):  # 14.1 GiB to pin, 10 GiB free
        host.check_host_memory(est.pinned, "the store", available=10 * GIB)


def test_offload_buffers_are_exact_and_reused():
    pool = host.HostBuffers(pin=False)
    a, b = pool.take(1000), pool.take(3)
    assert (a.numel(), b.numel(), pool.allocated) == (1000, 3, 1003)
    pool.give(a)
    assert pool.take(1000) is a and pool.allocated == 1003  # the next step reuses it
    assert pool.take(1000) is not a and pool.allocated == 2003


def test_offload_gives_back_the_buffer_it_took(cuda_register):
    """Page-aligned registered buffers are views into a slightly larger allocation: the offload
    hands the pool back exactly the bytes it took (same start, same length)."""
    from dreamrelation_core.training.memory.activations import ActivationOffload

    off = ActivationOffload("cpu")
    off.pool = host.HostBuffers(pin=True)  # registered buffers (recorded), as on CUDA
    t = torch.randn(3, 5, dtype=torch.bfloat16)
    h, _ = off.to_host(t)
    assert torch.equal(h, t) and cuda_register["register"][-1] == (h.data_ptr(), 30)
    off.release(h)
    (buf,) = off.pool.free[30]
    assert buf.data_ptr() == h.data_ptr() and buf.numel() == 30
    h2, _ = off.to_host(t * 2)
    assert h2.data_ptr() == h.data_ptr() and off.pool.allocated == 30 and len(cuda_register["register"]) == 1


@pytest.mark.parametrize("cap, dtype, flash, efficient, expected", [
    ((9, 0), "bf16", True, True, "flash"),
    ((8, 6), "bf16", True, True, "flash"),
    ((8, 6), "bf16", False, True, "efficient"),
    ((7, 5), "bf16", True, True, "math"),  # T4, RTX 20xx, Quadro RTX 5000: no bf16 kernel but math
    ((7, 5), "fp16", True, True, "efficient"),  # fp16 would keep the memory-efficient kernel
    ((7, 0), "fp16", True, False, "math"),
    ((6, 1), "bf16", True, True, "math"),
])
def test_attention_kernel_rule(cap, dtype, flash, efficient, expected):
    assert choose_kernel(cap, dtype, flash, efficient) == expected


def test_gpu_benchmark_runs_dry_and_refuses_without_cuda():
    """benchmarks/gpu_memory.py: its cases run (tiny model, CPU) and swap / offload agree with the
    plain run; without --dry-run on a machine without CUDA it refuses with exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_memory.py"
    dry = subprocess.run([sys.executable, str(script), "--dry-run", "--cases", "fp8", "fp8_swap_offload"],
                         capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "| fp8_swap_offload | fp8 ckpt swap2 offload | 2 | ok |" in dry.stdout
    assert "fp8_swap_offload vs fp8: losses agree" in dry.stdout and "DRY RUN" in dry.stdout
    if not torch.cuda.is_available():
        real = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
        assert real.returncode == 2 and "needs a CUDA GPU" in real.stderr


def test_policy_reports_the_math_kernel_cost(tmp_path):
    """On a pre-Ampere card the choice counts the score matrices and says what they cost; at 61
    frames nothing fits 16 GB then, and the refusal says why."""
    from diffusers import MochiTransformer3DModel

    from dreamrelation_core.errors import TrainingError
    from dreamrelation_core.training.config import TrainConfig
    from dreamrelation_core.training.memory.policy import resolve

    with torch.device("meta"):
        mochi = MochiTransformer3DModel()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    cuda = torch.device("cuda")
    small = resolve(cfg, cuda, mochi, (5, 30, 52), free_bytes=int(15.3 * GIB), attention="math")  # 25 frames, 240x416
    flash = resolve(cfg, cuda, mochi, (5, 30, 52), free_bytes=int(15.3 * GIB), attention="flash")
    assert small.estimate.attention_kernel == "math" and small.estimate.parts["attention"] > 3 * flash.estimate.parts["attention"]
    assert small.options.blocks_to_swap >= flash.options.blocks_to_swap
    assert "attention kernel: math" in small.summary() and "GiB more than a flash kernel" in small.summary()
    assert "attention kernel" not in flash.summary()
    with pytest.raises(TrainingError, match=r"no option set fits.*attention kernel: math .* \d+\.\d+ GiB more"):
        resolve(cfg, cuda, mochi, (11, 60, 106), free_bytes=int(15.3 * GIB), attention="math")
