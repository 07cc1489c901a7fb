"""vsbench: virtual-staining benchmark campaigns as one Snakemake DAG.

Importing the package is cheap on purpose: heavy libraries (torch, lightning,
waveorder, iohub) are imported inside the modules that need them, so the
Snakefile and a dry run stay fast.
"""

__version__ = "0.1.0"
