"""The sizes of a run: BenchConfig (per device and --smoke) and the release's protocol sizes that the
protocol section extrapolates to."""
from __future__ import annotations

from dataclasses import dataclass

from .library import ZERO_SHOT_EVALS_PER_EPOCH, RunConfig

# The release's protocols (METHOD.md sections 5 and 6): the sizes the extrapolations use.
EPOCHS = 50
FEW_SHOT_TRAIN_IMAGES = 88  # 4-shot: (4 abnormal + 4 normal) x 11 augmentations
FEW_SHOT_BANK_IMAGES = 44  # the augmented normal images
BRAIN_TEST_IMAGES = 3715
ZERO_SHOT_TRAIN_IMAGES = 8000  # about the sum of the five source datasets' test splits
ZERO_SHOT_TEST_IMAGES = 1493
ZERO_SHOT_EVALS = EPOCHS * ZERO_SHOT_EVALS_PER_EPOCH
ZERO_SHOT_TARGETS = 6  # the benchmark's datasets: each is a zero-shot target, trained in lockstep by reproduce


@dataclass
class BenchConfig:
    """Sizes of every section; `for_device` fills the defaults of a CPU, a CUDA or a smoke run."""

    device: str = "cpu"
    smoke: bool = False
    model_name: str = "ViT-L-14-336"
    img_size: int = 240
    stages: tuple[int, ...] = (6, 12, 18, 24)
    precision: str = "fp32"  # the training/evaluation precision (the CLI's default per device)
    eval_batch_size: int = 8  # the CLI's default
    forward_batches: tuple[int, ...] = (1, 4, 8)  # CPU; 8 is the scripts' evaluation batch
    forward_precisions: tuple[str, ...] = ("fp32",)
    forward_repeats: int = 2
    forward_min_seconds: float = 0.0  # CUDA: time each batch size for at least this long
    matmul_size: int = 4096
    matmul_repeats: int = 5
    train_rounds: int = 2
    protocol_train_images: int = 8
    protocol_bank_images: int = 8
    protocol_test_images: int = 16
    auroc_n: int = 200_000_000
    sklearn_budget_s: float = 600.0
    # evaluate's memory at two test-set sizes, both over one batch (from the second batch on, the
    # previous batch's tokens are alive during a forward: a one-off step, not a per-image cost), and
    # far enough apart that the maps (230 KB per image at 240 px) show above the noise of RSS
    memory_images: tuple[int, int] = (16, 64)
    bank_tokens: int = 100_000
    startup_repeats: int = 1
    process_shot: int = 4
    process_test_images: int = 12
    # section reproduce: epochs of each tiny run; a second count also times one-by-one and grouped at it,
    # whence each way's cost per further epoch (the one-off costs fall away over the paper's 50 epochs)
    reproduce_epochs: tuple[int, ...] = (2, 4)
    reproduce_splits: int = 4  # ... few-shot splits of each dataset
    reproduce_test_images: int = 20  # ... and test images of each dataset
    reproduce_repeats: int = 2  # ... each of the three ways timed this often, interleaved; the best is kept
    threads: int | None = None  # torch (and children's OpenMP) threads; None: torch's default

    @classmethod
    def for_device(cls, device: str, smoke: bool, full_protocol: bool) -> "BenchConfig":
        eval_batch = RunConfig.__dataclass_fields__["eval_batch_size"].default
        if smoke:
            return cls(
                device=device, smoke=True, model_name="ViT-Tiny-14", img_size=56, stages=(2, 4, 6, 8),
                precision="fp16" if device.startswith("cuda") else "fp32", eval_batch_size=eval_batch,
                forward_batches=(1, 2), forward_precisions=("fp16", "bf16") if device.startswith("cuda") else ("fp32",),
                forward_repeats=1, matmul_size=512, matmul_repeats=2, train_rounds=1, protocol_train_images=3,
                protocol_bank_images=4, protocol_test_images=6, auroc_n=200_000, sklearn_budget_s=30.0,
                memory_images=(9, 17), bank_tokens=20_000, startup_repeats=1, process_test_images=4,
                reproduce_epochs=(1,), reproduce_splits=1, reproduce_test_images=8, reproduce_repeats=1,
                threads=1,  # tiny tensors: thread barriers would cost more than they save
            )
        if device.startswith("cuda"):
            return cls(
                device=device, precision="fp16", eval_batch_size=eval_batch,
                forward_batches=(1, 8, 32, 64, 128, 256), forward_precisions=("fp16", "bf16"),
                forward_repeats=3, forward_min_seconds=1.0, matmul_size=8192, matmul_repeats=10,
                train_rounds=10, protocol_train_images=FEW_SHOT_TRAIN_IMAGES,
                protocol_bank_images=FEW_SHOT_BANK_IMAGES,
                protocol_test_images=BRAIN_TEST_IMAGES if full_protocol else 512,
                memory_images=(256, 1024), bank_tokens=1_000_000, startup_repeats=3,
            )
        return cls(
            device=device, eval_batch_size=eval_batch,
            protocol_test_images=BRAIN_TEST_IMAGES if full_protocol else 16,
            protocol_train_images=FEW_SHOT_TRAIN_IMAGES if full_protocol else 8,
            protocol_bank_images=FEW_SHOT_BANK_IMAGES if full_protocol else 8,
        )

    @classmethod
    def from_dict(cls, values: dict) -> "BenchConfig":
        """The inverse of dataclasses.asdict through JSON (a child process's configuration)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})
