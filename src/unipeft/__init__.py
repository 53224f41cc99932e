"""unipeft: parameter-efficient fine-tuning as points in He et al.'s unified design space."""

__version__ = "0.1.0"
