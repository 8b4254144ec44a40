"""Launch code shared by the row-scan kernels (`gae`, `ppo_loss`) and the interpreter switch of every kernel.

- `INTERPRET`: TRITON_INTERPRET=1 was set before triton was imported; the kernels then run on CPU tensors (tests),
  with no `num_warps` and no autotuning.
- `launch_options()`: the keyword arguments of a GPU launch (`num_warps`), none under the interpreter.
- `launch_plan`: how a (B, T) row-wise kernel cuts each row into chunks of whole tiles so that B x chunks programs
  fill the device; each kernel says how many programs per SM it wants.
- `ceil_div`, `next_power_of_two`: launch arithmetic in plain Python; `triton.cdiv` and `triton.next_power_of_2` are
  constexpr functions that cost ~1.5 us per host call, several times per launch.
- `row_major`, `mask_for_kernel`: inputs as the kernels read them (time stride 1; a bool mask viewed as uint8).
- `LOG_RATIO_CLAMP`, `K3_CLAMP`: the clamps of `stepsearch.algo.kl` as Triton compile-time constants, so kernels
  and twins cannot disagree on them.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from stepsearch.algo import kl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_NUM_WARPS = 4
# Without a CUDA device (interpreter, offline compiles) plans are made for an H100 (132 SMs).
_DEFAULT_NUM_SMS = 132

LOG_RATIO_CLAMP = tl.constexpr(kl.LOG_RATIO_CLAMP)
K3_CLAMP = tl.constexpr(kl.K3_CLAMP)


def launch_options() -> dict:
    return {} if INTERPRET else {"num_warps": GPU_NUM_WARPS}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def launch_plan(
    batch: int, length: int, device: torch.device, *, max_block: int, programs_per_sm: int
) -> tuple[int, int]:
    """(BLOCK, chunk_len): tiles of at most `max_block` tokens, and at most enough chunks per row (whole tiles each)
    for about `programs_per_sm` x SMs (chunk, row) programs in all; one chunk per row when the rows fill the GPU."""
    block = min(max_block, max(16, next_power_of_two(length)))
    tiles = ceil_div(length, block)
    num_chunks = max(1, min(tiles, ceil_div(programs_per_sm * num_sms(device), max(batch, 1))))
    return block, ceil_div(tiles, num_chunks) * block


def row_major(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Any row stride is fine; the time stride must be 1."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def mask_for_kernel(loss_mask: torch.Tensor) -> torch.Tensor:
    """The mask with time stride 1; a bool mask viewed as uint8 (Triton loads bytes, the kernels test `!= 0`)."""
    loss_mask = row_major(loss_mask)
    return loss_mask.view(torch.uint8) if loss_mask.dtype == torch.bool else loss_mask
