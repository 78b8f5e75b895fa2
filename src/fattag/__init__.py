"""fattag: two-stage K-fold audio tagging for FAT2019-shaped data (Kaggle-kernel style)."""
__version__ = "0.1.0"

import warnings

# fastai 2.8 calls torch.jit.script at import time; newer torch warns about it on every run. Noise, not news.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def __getattr__(name):
    """`from fattag import Tagger` without importing torch for the modules that need none (cost.py, config.py)."""
    if name == "Tagger":
        from .tag import Tagger
        return Tagger
    raise AttributeError(f"module 'fattag' has no attribute {name!r}")
