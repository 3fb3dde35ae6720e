"""Data: sources (shipped corpora and your own files), partitioning, tasks (records → model inputs).

Importing the package registers the image datasets (``digits``, ``mnist5k``, ``textile``), the image tasks,
the generative task and the generative datasets (``celora.data.generate``, ``celora.data.formats``).
"""

from celora.data import generate as _generate  # noqa: F401  (registration)
from celora.data import generative_sets as _generative_sets  # noqa: F401  (registration)
from celora.data import images as _images  # noqa: F401  (registration)
