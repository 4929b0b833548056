"""MVFA train few (the release's script name); flags: python train_few.py --help."""
import sys

from mvfa.cli import main_train_few

if __name__ == "__main__":
    sys.exit(main_train_few())
