"""lgg: localize and segment lower-grade glioma FLAIR abnormalities in the Kaggle LGG MRI set."""

__version__ = "0.1.0"
