"""The run logger: train_log rows and step losses as curves (TensorBoard when asked for)."""
from __future__ import annotations

import pytest

from mvfa.runs.run_log import RunLogger, TensorBoardLogger, make_logger
from mvfa.runtime.errors import MVFAError


class FakeWriter:
    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_rows_become_curves(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", writer_factory=FakeWriter)
    logger.scalar("train/loss", 0.5, 3)
    logger.row({"epoch": 1, "step": 3, "loss": 0.25, "effective_batch_size": 2, "test_image_auroc": 0.75,
                "test_pixel_auroc": 0.5, "valid_Brain": 0.6}, 3)
    logger.row({"epoch": 1, "step": 0, "loss": ""}, 0)  # before the first step: no mean loss yet
    logger.close()
    assert logger.writer.scalars == [
        ("train/loss", 0.5, 3), ("epoch/loss", 0.25, 3), ("test/image_auroc", 0.75, 3), ("test/pixel_auroc", 0.5, 3),
        ("valid/Brain", 0.6, 3),
    ]
    assert logger.writer.closed and logger.writer.log_dir == str(tmp_path / "tb")


def test_make_logger_choices(tmp_path):
    assert type(make_logger("none", tmp_path)) is RunLogger
    with pytest.raises(MVFAError, match="--logger 'wandb' is not known: choose one of none, tensorboard"):
        make_logger("wandb", tmp_path)


def test_tensorboard_without_its_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(MVFAError, match="needs the tensorboard package: pip install tensorboard"):
        make_logger("tensorboard", tmp_path)
