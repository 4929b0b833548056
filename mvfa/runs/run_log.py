"""Where a training run's curves go besides train_log.csv: nowhere (the default) or TensorBoard.

`--logger tensorboard` writes event files under `<output_dir>/tensorboard` with torch's
SummaryWriter, which needs the `tensorboard` package (not a dependency of the toolkit: install it to
use this). Scalars: `train/loss` per step, and each train_log row's numbers (e.g.
`test/image_auroc`, `test/pixel_auroc`, `epoch/loss`) at the step it was written.
"""
from __future__ import annotations

from pathlib import Path

from mvfa.runtime.errors import MVFAError

LOGGERS = ("none", "tensorboard")
NOT_CURVES = ("epoch", "step", "effective_batch_size")  # a log row's place and settings, not curves


class RunLogger:
    """The null logger; subclasses send scalars somewhere."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def row(self, row: dict, step: int) -> None:
        """A train_log row: each number becomes a curve named `<split>/<metric>` (`test_image_auroc`
        -> `test/image_auroc`; the row's mean loss -> `epoch/loss`)."""
        for key, value in row.items():
            if key in NOT_CURVES or isinstance(value, str) or value is None:
                continue
            split, _, metric = key.partition("_")
            tag = f"{split}/{metric}" if metric else f"epoch/{key}"
            self.scalar(tag, float(value), step)

    def close(self) -> None:
        pass


class TensorBoardLogger(RunLogger):
    def __init__(self, folder: Path, writer_factory=None) -> None:
        if writer_factory is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MVFAError(
                    "--logger tensorboard needs the tensorboard package: pip install tensorboard (or use --logger none)"
                ) from None
            writer_factory = SummaryWriter
        self.folder = folder
        self.writer = writer_factory(log_dir=str(folder))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def make_logger(kind: str, output_dir: Path) -> RunLogger:
    """The logger `--logger kind` asks for (its files under `output_dir`)."""
    if kind not in LOGGERS:
        raise MVFAError(f"--logger {kind!r} is not known: choose one of {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        return TensorBoardLogger(output_dir / "tensorboard")
    return RunLogger()
