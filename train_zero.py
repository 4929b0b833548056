"""MVFA train zero (the release's script name); flags: python train_zero.py --help."""
import sys

from mvfa.cli import main_train_zero

if __name__ == "__main__":
    sys.exit(main_train_zero())
