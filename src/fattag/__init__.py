"""fattag: two-stage K-fold audio tagging for FAT2019-shaped data (Kaggle-kernel style)."""
__version__ = "0.1.0"
