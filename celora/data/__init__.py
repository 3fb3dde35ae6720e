"""Data: sources (shipped corpora and your own files), partitioning, tasks (records → model inputs).

Importing the package registers the image datasets (``digits``, ``mnist5k``, ``textile``) and the image tasks.
"""

from celora.data import images as _images  # noqa: F401  (registration)
