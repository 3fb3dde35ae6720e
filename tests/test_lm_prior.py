"""The language-model prior of the text attack: beam search across tokenizers, the LM score, the re-ranking."""

from __future__ import annotations

import json

import pytest
import torch

from celora.config import load_config
from celora.errors import CeloraError
from celora.fl.prepare import prepare
from celora.models.zoo import load_model
from celora.privacy.attacks.lm_prior import LMPrior, TextPrior, beam_decode, special_frame
from celora.privacy.inversion import _eager_attention

TINY = ["model.name=tiny-bert", "model.rank=4", "model.max_length=12", "num_clients=2", "data.max_samples=60"]

# Five tokens in 2-D: 0, 1 are specials; x rows sit exactly between tokens 2 and 3 (ambiguous), or on 4.
TABLE = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
NAMES = {2: "a", 3: "b", 4: "c"}


def _decode(ids):
    return "".join(NAMES.get(int(i), "") for i in ids)


def _prefers(word):
    """A hand-built prior: log p(text) = −(number of characters of text that differ from ``word``'s)."""

    def lm(texts):
        return torch.tensor([-float(sum(c != word[i % len(word)] for i, c in enumerate(t))) for t in texts])

    return lm


def test_beam_search_follows_the_prior_only_where_the_embeddings_are_ambiguous():
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    frame = ([0], [1])
    for word, middle in (("aac", [2, 2, 4]), ("bbc", [3, 3, 4]), ("abc", [2, 3, 4])):
        beams = beam_decode(x, TABLE, _decode, _prefers(word), frame=frame, banned=[0, 1], top_k=3, beam=3, weight=1)
        assert beams[0] == [0, *middle, 1]  # the prior breaks the ties; position 3 stays on its embedding (c)
    # a prior that wants 'a' at the clear 'c' position loses to the embedding when its weight is small
    beams = beam_decode(x, TABLE, _decode, _prefers("aaa"), frame=frame, banned=[0, 1], top_k=3, weight=0.1)
    assert beams[0][3] == 4 and all(v not in (0, 1) for v in beams[0][1:-1])
    with pytest.raises(CeloraError, match="top_k"):
        beam_decode(x, TABLE, _decode, _prefers("a"), top_k=0)


def test_lm_prior_scores_texts_independently_of_padding():
    lm = load_model("tiny-llama", 0, head="lm")
    prior = LMPrior(lm.model, lm.tokenizer)
    together = prior(["ab", "abcdef", ""])
    alone = torch.cat([prior(["ab"]), prior(["abcdef"])])
    assert torch.allclose(together[:2], alone, atol=1e-5)
    assert together[2] == 0.0 and (together[:2] < 0).all()
    ids = lm.tokenizer("ab", add_special_tokens=False)["input_ids"]  # by hand: Σ log p(u_i | start, u_<i)
    full = torch.tensor([[prior.start, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=full).logits[0, :-1], -1)
    assert float(together[0]) == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(ids))), abs=1e-5)


def test_special_frame_of_a_bert_tokenizer():
    tok = load_model("tiny-bert", 2).tokenizer
    assert special_frame(tok) == ([tok.cls_token_id], [tok.sep_token_id])


def test_attack_with_a_prior_never_raises_the_matching_loss(tmp_path):
    from celora.attack import attack_experiment, write_outputs

    p = prepare(load_config(None, TINY))
    _eager_attention(p.loaded.model)
    result, meta = attack_experiment(
        load_config(None, TINY), "c-known", samples=2, iterations=10, warm_steps=2, prepared=p, lm_prior="tiny-llama"
    )
    assert meta["lm_prior"] == "tiny-llama" and result.summary["methods"] == ["optimisation+lm"]
    for row in result.rows:
        assert row["token_loss"] <= row["token_loss_nearest"]
        assert 0.0 <= row["nearest_rouge1"] <= 1.0
    assert "nearest_rouge1" in result.summary["metrics"]
    files = write_outputs(result, meta, tmp_path)
    assert json.loads(files[0].read_text())["settings"]["lm_prior"] == "tiny-llama"


def test_prior_bad_inputs():
    from celora.attack import attack_experiment

    with pytest.raises(CeloraError, match="--lm-weight"):
        attack_experiment(load_config(None, TINY), "c-known", samples=1, lm_prior="tiny-llama", lm_weight=-1)
    with pytest.raises(CeloraError, match="causal-LM form"):
        attack_experiment(load_config(None, TINY), "c-known", samples=1, iterations=1, lm_prior="tiny-bert")


def test_text_prior_candidates_are_beams_of_the_sequence():
    prior = TextPrior(_prefers("ab"), _decode, ([0], [1]), (0, 1), top_k=2, beam=2, weight=1.0)
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    cands = prior.candidates(x, TABLE)
    assert len(cands) == 2 and cands[0] == [0, 2, 3, 1]
