"""The release's loss module: `FocalLoss`, `BinaryDiceLoss` (logic lives in mvfa.method.losses)."""
from mvfa.method.losses import BinaryDiceLoss, FocalLoss, det_loss

__all__ = ["BinaryDiceLoss", "FocalLoss", "det_loss"]
