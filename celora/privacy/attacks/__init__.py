"""Gradient-inversion attacks, one file each, behind a registry (name → function).

* ``span``  — DAGER-style span test on the first adapted layer (span.py)
* ``text``  — continuous input-embedding optimisation, TAG/LAMP style (text.py)
* ``image`` — Inverting Gradients: cosine matching + total variation (image.py)
* ``image-span`` — span inversion of the first adapted layer for ViT patches (image_span.py)
* ``head``  — label and pooled feature from a linear head's gradient, iDLG (head.py)

``lm_prior.py`` is not an attack: the language-model prior the ``text`` attack reads tokens off with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celora.privacy.attacks.head import head_leak
from celora.privacy.attacks.image import optimise_image
from celora.privacy.attacks.image_span import invert_image_span
from celora.privacy.attacks.span import span_reconstruct
from celora.privacy.attacks.text import optimise_text
from celora.registry import Registry

ATTACKS: Registry[Callable[..., Any]] = Registry("attack", "attack")
ATTACKS.add("span", span_reconstruct)
ATTACKS.add("text", optimise_text)
ATTACKS.add("image", optimise_image)
ATTACKS.add("image-span", invert_image_span)
ATTACKS.add("head", head_leak)
