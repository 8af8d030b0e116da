"""The feature fitted to massive-activation tokens: it carries their output along its direction, on held-out outliers
too, fires on no other token, and takes the slot of a feature that never fired."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.outlier_features import MIN_OUTLIERS, fit_outlier_feature
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig

D, D_SAE, DEAD = 32, 64, 17


def transcoder(activation: str = "jumprelu") -> Transcoder:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D, generator=g), dim=-1)
    b_enc = torch.full((D_SAE,), -0.5)
    b_enc[DEAD] = -1e3  # never fires
    cfg = TranscoderConfig(layer=3, d_in=D, d_sae=D_SAE, d_out=D, hook_in="blocks.3.ln2.hook_normalized",
                           hook_out="blocks.3.hook_mlp_out", activation=activation)
    return Transcoder(cfg, W_dec.T.contiguous() * 0.5, b_enc, W_dec, torch.zeros(D), W_skip=0.1 * torch.randn(D, D, generator=g),
                      threshold=torch.full((D_SAE,), 0.1) if activation == "jumprelu" else None)


class Tokens:
    """Typical tokens whose output the transcoder reconstructs up to noise, and outliers, their input shifted along
    `marker` by 8-12 (as a sink token's input stands out), whose output adds a massive term along `massive`, its size
    proportional to that shift."""

    def __init__(self, tc: Transcoder, seed: int):
        g = torch.Generator().manual_seed(100)
        self.marker, self.massive = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1)
        g.manual_seed(seed)
        self.x = torch.randn(2000, D, generator=g)
        self.outlier = torch.zeros(2000, dtype=torch.bool)
        self.outlier[torch.randperm(2000, generator=g)[:20]] = True
        self.x[self.outlier] += (8 + 4 * torch.rand(20, 1, generator=g)) * self.marker
        self.y = tc.forward(self.x) + 0.05 * torch.randn(2000, D, generator=g)
        self.y[self.outlier] += 150 * (self.x[self.outlier] @ self.marker)[:, None] * self.massive


def test_fitted_feature_reconstructs_the_outliers_and_nothing_else():
    tc = transcoder()
    train, held_out = Tokens(tc, seed=1), Tokens(tc, seed=2)
    before = {name: getattr(tc, name).clone() for name in ("W_enc", "b_enc", "W_dec", "threshold")}
    typical_before = tc.forward(train.x[~train.outlier])

    slot = fit_outlier_feature(tc, train.x, train.y, train.outlier)

    assert slot == DEAD
    others = torch.arange(D_SAE) != DEAD
    assert torch.equal(tc.W_enc[:, others], before["W_enc"][:, others]) and torch.equal(tc.W_dec[others], before["W_dec"][others])
    assert torch.equal(tc.b_enc[others], before["b_enc"][others]) and torch.equal(tc.threshold[others], before["threshold"][others])
    assert abs(torch.dot(tc.W_dec[DEAD], train.massive).item()) == pytest.approx(1.0, abs=1e-4)
    for tokens in (train, held_out):
        z = tc.encode(tokens.x)
        assert (z[:, DEAD] > 0).tolist() == tokens.outlier.tolist()
        error = (tc.forward(tokens.x) - tokens.y).pow(2).sum(-1)
        variance = (tokens.y - tokens.y.mean(0)).pow(2).sum(-1)
        assert error[tokens.outlier].sum() < 1e-3 * variance[tokens.outlier].sum()
    torch.testing.assert_close(tc.forward(train.x[~train.outlier]), typical_before, rtol=0, atol=0)


def test_no_fit_without_enough_outliers_or_a_threshold():
    tc = transcoder()
    tokens = Tokens(tc, seed=1)
    few = tokens.outlier & (tokens.outlier.cumsum(0) < MIN_OUTLIERS)
    assert fit_outlier_feature(tc, tokens.x, tokens.y, few) is None
    relu = transcoder("relu")
    assert fit_outlier_feature(relu, tokens.x, tokens.y, tokens.outlier) is None
    # "outliers" whose output the transcoder already reconstructs: no threshold removes error, nothing changes
    plain = tc.forward(tokens.x)
    W_dec = tc.W_dec.clone()
    assert fit_outlier_feature(tc, tokens.x, plain, tokens.outlier) is None
    assert torch.equal(tc.W_dec, W_dec)


def test_the_feature_fires_on_no_ordinary_token_of_the_buffer():
    """Ordinary tokens that look like outliers to the encoder (decoys: input shifted like theirs, output ordinary) set
    the threshold above themselves: without that rule the squared-error optimum fires on them too (their error is small
    next to what the outliers gain), writing a massive vector where none belongs."""
    tc = transcoder()
    tokens = Tokens(tc, seed=1)
    decoys = (~tokens.outlier).nonzero().squeeze(1)[:3]
    tokens.x[decoys] += 9 * tokens.marker
    tokens.y[decoys] = tc.forward(tokens.x[decoys])
    slot = fit_outlier_feature(tc, tokens.x, tokens.y, tokens.outlier)
    fires = tc.encode(tokens.x)[:, slot] > 0
    assert not fires[~tokens.outlier].any()
    assert 0 < fires[tokens.outlier].sum() < tokens.outlier.sum()  # the outliers above the highest decoy
