"""How a run computes: autocast, progress bars, seeding, torch.compile."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from tqdm import tqdm

from mvfa.runtime.distributed import is_secondary_rank
from mvfa.runtime.errors import MVFAError


def progress(iterable, desc: str):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, pipes, tests) and on ranks other than 0."""
    return tqdm(iterable, desc=desc, leave=False, disable=True if is_secondary_rank() else None)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast on CUDA for fp16/bf16; nothing on CPU (fp32 there: bf16 is slow on CPUs)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed the global generators, as the release does (a --pretrain none backbone draws from torch's);
    the release's own draws are replayed on private generators (mvfa.runs.replay)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _CompiledMethod:
    """A method of the model under torch.compile; a failure to compile it is a one-line MVFAError."""

    def __init__(self, method, name: str) -> None:
        self.compiled = torch.compile(method)
        self.name = name

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # dynamo's and inductor's own failures (not user errors)
            cause = getattr(err, "inner_exception", None) or err.__cause__ or err  # e.g. the C++ compiler's error
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            reason = f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__
            raise MVFAError(f"--compile: torch.compile failed on the model's {self.name} ({reason}); run without --compile") from None


def compile_model(model) -> None:
    """--compile: torch.compile (inductor) the two halves of the adapted ViT's forward, `encode_prefix`
    (the frozen blocks before the first adapter stage) and `forward_from_prefix` (the rest, with the
    adapters), which every training step, evaluation, prefix cache and memory bank goes through.

    Compilation happens at the first call of each shape and grad mode (a few recompilations per run).
    Compiled kernels fuse and order operations differently, so results agree with the eager run to
    float rounding, not bit for bit; without --compile nothing changes.
    """
    try:
        import torch._dynamo  # noqa: F401 - the exception classes _CompiledMethod catches
    except Exception as err:  # a torch build without dynamo
        raise MVFAError(f"--compile: torch.compile is not available in this torch build ({err}); run without --compile") from None
    model.encode_prefix = _CompiledMethod(model.encode_prefix, "frozen blocks (encode_prefix)")
    model.forward_from_prefix = _CompiledMethod(model.forward_from_prefix, "adapted blocks (forward_from_prefix)")
