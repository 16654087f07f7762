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
