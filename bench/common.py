"""Helpers the benchmark scripts share: ABBA runs and how each tool's precision is described."""
from __future__ import annotations

from typing import Callable

TOOLS_ABBA = ('reference', 'nnunet_lite', 'nnunet_lite', 'reference')


def abba(rounds: int, measure: Callable[[str], object], show: Callable[[object], str]) -> dict[str, list]:
    "Run `measure(tool)` in the order reference, ours, ours, reference, `rounds` times, printing `show(result)` each time."
    results = {'reference': [], 'nnunet_lite': []}
    for _ in range(rounds):
        for tool in TOOLS_ABBA:
            result = measure(tool)
            results[tool].append(result)
            print(f"  {tool:12s} {show(result)}", flush=True)
    return results


def precisions(device: str, no_amp: bool) -> tuple[str, str]:
    "(reference's, ours) precision on `device`: the reference autocasts to float16 on CUDA only; ours as amp_dtype says."
    import torch
    from nnunet_lite.training import amp_dtype
    ours = None if no_amp else amp_dtype(torch.device(device))
    reference = 'float16 autocast' if device.startswith('cuda') else 'float32'
    return reference, f"{str(ours).removeprefix('torch.')} autocast" if ours else 'float32'


# --- how close to the machine's limit a training step runs ---------------------------------------------------------

def step_flops(network, in_channels: int, patch, batch_size: int, device: str = 'cpu') -> float:
    """Floating-point operations of one training step of `network` (forward + backward of every convolution and
    transposed convolution, as torch's FlopCounterMode counts them: 2 per multiply-add) on a batch of zeros."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(batch_size, in_channels, *patch, device=device)
    was_training = network.training
    network.train()
    with FlopCounterMode(display=False) as counter:
        out = network(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().sum() for o in outs).backward()
    network.zero_grad(set_to_none=True)
    network.train(was_training)
    return float(counter.get_total_flops())


def _cpu_mhz() -> float | None:
    "The CPU's maximum clock (lscpu's 'CPU max MHz'), else the clock /proc/cpuinfo reports."
    import subprocess
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith('CPU max MHz:'): return float(line.split(':')[1])
        with open('/proc/cpuinfo') as f:
            return float(next(l for l in f if l.startswith('cpu MHz')).split(':')[1])
    except (OSError, StopIteration, ValueError, subprocess.SubprocessError):
        return None


def cpu_peak_gflops(precision: str, threads: int) -> tuple[float | None, str]:
    """Peak GFLOP/s of `threads` cores of this CPU for `precision` ('float32' or a bf16 autocast), and how it was
    counted: cores x clock x FLOPs per cycle, taking two FMA units per core (FLOPs/cycle: AVX2 32, AVX-512 64 in
    float32; AVX512-BF16 128 and AMX-BF16 1024 in bf16). The units are the ones torch itself detects and dispatches
    to (as `nnunet_lite.training.cpu_has_native_bf16` does). An estimate: turbo clocks and units differ by model."""
    import torch
    mhz = _cpu_mhz()
    if not mhz: return None, 'clock unknown'
    bf16 = 'bfloat16' in precision or 'bf16' in precision
    vector = torch.backends.cpu.get_cpu_capability()        # 'AVX512', 'AVX2', 'DEFAULT', ...
    if bf16 and torch.cpu._is_amx_tile_supported(): per_cycle, what = 1024, 'AMX-BF16 1024'
    elif bf16 and torch.cpu._is_avx512_bf16_supported(): per_cycle, what = 128, 'AVX512-BF16 128'
    elif vector.startswith('AVX512'): per_cycle, what = 64, 'AVX-512 FMA 64'
    elif vector == 'AVX2': per_cycle, what = 32, 'AVX2 FMA 32'
    else: per_cycle, what = 8, f'{vector} 8'
    return threads * mhz / 1000 * per_cycle, f'{threads} cores x {mhz / 1000:.2f} GHz x {what} FLOPs/cycle'


GPU_PEAK_TFLOPS = {   # dense tensor-core bf16/fp16 and plain fp32, from the makers' data sheets (SXM parts)
    'H200': (989.0, 67.0), 'H100': (989.0, 67.0), 'A100': (312.0, 19.5), 'L40S': (362.0, 91.6),
    'A10': (125.0, 31.2), 'L4': (121.0, 30.3), 'T4': (65.0, 8.1), 'V100': (125.0, 15.7),
}


def gpu_peak_gflops(precision: str, device: str = 'cuda') -> tuple[float | None, str]:
    "Peak GFLOP/s of the GPU for `precision` from GPU_PEAK_TFLOPS by its name (None when it is not listed)."
    import torch
    name = torch.cuda.get_device_name(torch.device(device))
    for key, (half, single) in GPU_PEAK_TFLOPS.items():
        if key in name:
            low = 'bf16' in precision or 'float16' in precision
            return (half if low else single) * 1000, f"{name}: {'bf16/fp16 tensor cores' if low else 'fp32'} data sheet"
    return None, f'{name}: peak not listed in bench/common.py GPU_PEAK_TFLOPS'


def machine_peak_gflops(device: str, precision: str) -> tuple[float | None, str]:
    import torch
    if device.startswith('cuda'): return gpu_peak_gflops(precision, device)
    return cpu_peak_gflops(precision, torch.get_num_threads())


def flops_line(tool: str, flops: float, seconds: float, peak: float | None) -> str:
    "`tool: G GFLOP/s (p % of the peak)` for a step of `flops` that took `seconds`."
    achieved = flops / seconds / 1e9
    share = f" = {100 * achieved / peak:5.1f} % of its peak {peak:,.0f} GFLOP/s" if peak else ''
    return f"  {tool:34s} {achieved:8.1f} GFLOP/s{share}"
