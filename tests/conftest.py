import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tiny_bert():
    from celora.models.zoo import load_model

    return load_model("tiny-bert", num_labels=3, seed=0)


TINY = (
    "model.name=tiny-bert",
    "model.rank=4",
    "model.max_length=48",
    "num_clients=3",
    "rounds=2",
    "data.max_samples=150",
    "train.batch_size=16",
    "train.threads=1",
)


class TinyConfig:
    """The tiny experiment every engine test starts from (random tiny-bert, 3 clients, 2 rounds, 150 BBC
    articles): ``tiny_config("method=fedit", "rounds=1")`` adds a test's own overrides."""

    def overrides(self, *extra: str) -> list[str]:
        """The ``--set`` items of the tiny experiment plus ``extra`` (for a real `celora run` process)."""
        return [*TINY, *extra]

    def __call__(self, *extra: str):
        from celora.config import load_config

        return load_config(None, self.overrides(*extra))


@pytest.fixture(scope="session")
def tiny_config() -> TinyConfig:
    return TinyConfig()
