"""The qing version (one home: ``qing.__version__``, the CLI's ``--version`` and Hub uploads read it)."""

__version__ = "0.1.0"
