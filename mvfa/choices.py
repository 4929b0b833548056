"""Choice lists and defaults that the command-line parsers need, in a module that imports no torch.

Every command builds and parses its flags before torch is imported (`--help` answers in a fraction
of a second), so the parsers read these values from here, not from the modules that use them. The
engine, training, evaluation, losses and distributed modules define the same names for their own
checks; tests/test_help.py asserts that both copies are equal, so they cannot drift apart.
"""
from __future__ import annotations

from pathlib import Path

MODES = ("few-shot", "zero-shot")
SELECTIONS = ("test", "valid", "last")  # model selection: the release (test labels), held-out valid data, last epoch
PREFIX_CACHE_MODES = ("auto", "on", "off")
PRECISIONS = ("fp32", "fp16", "bf16")  # autocast dtype on CUDA
NORMALIZATIONS = ("test", "valid", "checkpoint")
THRESHOLD_RULES = ("f1", "fpr")
CALIBRATION_RULES = (*THRESHOLD_RULES, "none")
SCORING_DTYPES = ("release", "fp32")
ORDERS = ("release", "sorted")  # zero-shot training: the file system's listing order (the release's) or sorted names
EVAL_SCHEDULES = ("release", "final")
DET_LOSS_FORMS = ("release", "bce")
DEFAULT_TIMEOUT_S = 600.0  # --dist_timeout: longest wait in one collective before a torchrun job fails
DEFAULT_SEED_DIR = Path(__file__).resolve().parents[1] / "dataset" / "fewshot_seed"

# mvfa.reproduce: protocol -> (--select, --normalize)
PROTOCOLS = {"release": ("test", "test"), "leakfree": ("valid", "valid")}
# mvfa.demo: the synthetic benchmark's datasets, in dataset.synthetic.SYNTHETIC_DATASETS's order
DEMO_DATASETS = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")
DEMO_FEW_EPOCHS = 5  # mvfa.demo.DemoSettings.few_epochs
DEMO_ZERO_EPOCHS = 2  # mvfa.demo.DemoSettings.zero_epochs
# mvfa.bench
BENCH_SECTIONS = ("forward", "train_step", "protocol", "auroc", "memory", "startup", "process", "reproduce")
BENCH_BRAIN_TEST_IMAGES = 3715
# mvfa.export_onnx
DEFAULT_OPSET = 17
