"""Training on a tiny model: saved SAELens transcoders learn something, and the reported FVU is true."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.train import TrainConfig, reusable, train_transcoders
from circuit_catalog.ingest.transcoder_formats import load_transcoders

from tests.conftest import DEVICES


def test_train_saves_reports_and_reuses(gpt2, text_file, tmp_path):
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[0, 2], d_sae=64, n_tokens=3000, ctx_len=32,
                      batch_contexts=8, minibatch=64, epochs=4, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    out = tmp_path / "tc"
    result = train_transcoders(gpt2, cfg, out, progress=False)
    tset = load_transcoders(out)
    assert tset.layers == [0, 2] and tset.format == "saelens"
    assert all(tc.W_dec.norm(dim=-1).sub(1).abs().max() < 1e-4 for tc in tset)  # unit-norm decoder rows

    check_reported_metrics(gpt2, text_file, cfg, tset, result)
    assert reusable(out, cfg).metrics == result.metrics
    assert reusable(out, TrainConfig(**{**cfg.__dict__, "seed": 1})) is None
    assert reusable(out, TrainConfig(**{**cfg.__dict__, "dtype": "bfloat16"})) is None


def check_reported_metrics(gpt2, text_file, cfg, tset, result) -> None:
    """Recompute FVU and L0 on the held-out contexts with a plain forward pass on the CPU, independently of train.py."""
    held_out = token_contexts(gpt2.tokenizer, str(text_file), cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)[:cfg.eval_tokens // cfg.ctx_len]
    _, cache = gpt2.run_with_cache(held_out)
    for m in result.metrics:
        x = cache[f"blocks.{m.layer}.ln2.hook_normalized"][:, 1:].reshape(-1, 32)
        y = cache[f"blocks.{m.layer}.hook_mlp_out"][:, 1:].reshape(-1, 32)
        z = tset[m.layer].encode(x)
        fvu = (tset[m.layer].decode(z) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert abs(m.fvu - fvu.item()) < 1e-3
        assert abs(m.l0 - (z > 0).float().sum(-1).mean().item()) < 1e-3
        assert m.fvu < 0.9, "training should beat the mean predictor clearly"


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_each_device(gpt2, model_on, text_file, tmp_path, device):
    """The model's forward passes and the training on `device` (the buffer in host memory): the saved transcoders'
    reported figures are true on the CPU, and close to a CPU run's (same seed: same start and minibatches)."""
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[0, 2], d_sae=64, n_tokens=3000, ctx_len=32,
                      batch_contexts=8, minibatch=64, epochs=4, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    here = train_transcoders(model_on("gpt2", device), cfg, tmp_path / "here", progress=False)
    check_reported_metrics(gpt2, text_file, cfg, load_transcoders(tmp_path / "here"), here)
    cpu = train_transcoders(gpt2, cfg, tmp_path / "cpu", progress=False)
    assert [m.fvu for m in here.metrics] == pytest.approx([m.fvu for m in cpu.metrics], abs=0.02)


def test_training_is_deterministic_for_a_seed(gpt2, text_file, tmp_path):
    """Resampling included: it draws from its own seeded generator."""
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[1], d_sae=16, k=4, n_tokens=600, ctx_len=32,
                      batch_contexts=8, minibatch=32, eval_tokens=64, dead_tokens=100, resamples=2)
    a = train_transcoders(gpt2, cfg, tmp_path / "a", progress=False)
    b = train_transcoders(gpt2, cfg, tmp_path / "b", progress=False)
    assert a.metrics == b.metrics
    torch.testing.assert_close(load_transcoders(tmp_path / "a")[1].W_enc, load_transcoders(tmp_path / "b")[1].W_enc)


def test_skip_transcoders_train_save_and_beat_plain_ones(gpt2, text_file, tmp_path):
    """Same budget with and without the skip path: the skip one saves as jumprelu_skip_transcoder and fits better."""
    import json

    base = dict(model="tiny", dataset=str(text_file), layers=[1], d_sae=16, k=4, n_tokens=2000, ctx_len=32, batch_contexts=8,
                minibatch=64, epochs=3, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    plain = train_transcoders(gpt2, TrainConfig(**base), tmp_path / "plain", progress=False)
    skip = train_transcoders(gpt2, TrainConfig(**base, skip=True), tmp_path / "skip", progress=False)
    assert json.loads((tmp_path / "skip" / "layer_1" / "cfg.json").read_text())["architecture"] == "jumprelu_skip_transcoder"
    loaded = load_transcoders(tmp_path / "skip")[1]
    assert loaded.W_skip is not None and loaded.W_skip.abs().sum() > 0
    assert skip.metrics[0].fvu < plain.metrics[0].fvu


BASE = dict(model="tiny", dataset="", layers=[0, 2], d_sae=64, n_tokens=3000, ctx_len=32, batch_contexts=8, minibatch=64,
            epochs=4, lr=2e-3, eval_tokens=256)


def test_batchtopk_saves_jumprelu_with_l0_near_k_and_a_curve(gpt2, text_file, tmp_path):
    """BatchTopK trains, saves as a JumpReLU transcoder whose calibrated threshold gives L0 near k on held-out tokens
    (no batch at inference), and records its curve: warm-up then decay, every point's figures finite."""
    import json

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, activation="batchtopk", k=8, warmup=0.1, decay=0.3)
    result = train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    assert json.loads((tmp_path / "tc" / "layer_0" / "cfg.json").read_text())["architecture"] == "jumprelu_transcoder"
    tset = load_transcoders(tmp_path / "tc")
    assert all(tc.cfg.activation == "jumprelu" and tc.threshold.min() > 0 for tc in tset)
    check_reported_metrics(gpt2, text_file, cfg, tset, result)
    assert all(0.5 * cfg.k <= m.l0 <= 2 * cfg.k for m in result.metrics), [m.l0 for m in result.metrics]

    record = json.loads((tmp_path / "tc" / "training.json").read_text())
    curve = record["curve"]
    steps = [p["step"] for p in curve]
    assert all(a < b for a, b in zip(steps, steps[1:])) and all(p["tokens"] == p["step"] * cfg.minibatch for p in curve)
    lrs = [p["lr"] for p in curve]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(cfg.lr) and lrs[0] < cfg.lr and lrs[-1] < 0.05 * cfg.lr and 0 < peak < len(lrs) - 1
    assert all(p["l0"] == pytest.approx(cfg.k, rel=0.01) for p in curve), "BatchTopK keeps k x B activations a minibatch"
    assert curve[-1]["fvu"] < curve[0]["fvu"]


def test_sparse_decoder_matches_the_dense_one_and_its_gradients(gpt2, text_file):
    """The gather-sum decoder gives the dense z @ W_dec and the same gradients for W_dec, W_enc and b_enc (autograd
    through both)."""
    from circuit_catalog.ingest.train import _StackedTranscoders, collect

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=5)
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 512, 32)[:4]
    x, y = collect(gpt2, tokens, cfg)
    torch.manual_seed(0)
    grads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        net = _StackedTranscoders(cfg, 32, x.float(), y.float())
        product = net.encoder_matmul(x.float())
        rows, features, values, _ = net.batch_topk(product)
        n_layers, B, _ = product.shape
        if sparse:
            recon = net.decode_sparse(rows, features, values, n_layers * B).reshape(n_layers, B, -1)
        else:
            z = torch.zeros(n_layers * B, cfg.d_sae).index_put((rows, features), values).reshape(n_layers, B, -1)
            recon = torch.bmm(z, net.W_dec)
        loss = (recon + net.b_dec - y.float()).pow(2).sum()
        loss.backward()
        grads.append((recon.detach(), net.W_dec.grad, net.W_enc.grad, net.b_enc.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in net.parameters()), "a strided weight is copied by every matmul and gradient"
    assert (rows.bincount(minlength=n_layers * B).reshape(n_layers, B).sum(1) <= cfg.k * B).all()


@pytest.mark.parametrize("every", [(3, 3), (3, 10), (20, 30)], ids=["more-dead-than-d/2", "uneven", "fewer-than-d/2"])
def test_aux_loss_reaches_only_dead_features(gpt2, text_file, every):
    """The auxiliary loss is the dead features' top-(d/2) reconstruction of the error, computed densely here, and its
    gradient reaches the decoder rows of dead features only; each layer with its own number of dead features, more or
    fewer than d/2."""
    from circuit_catalog.ingest.train import _StackedTranscoders, collect

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=5, dead_tokens=100)
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 512, 32)[:4]
    x, y = collect(gpt2, tokens, cfg)
    net = _StackedTranscoders(cfg, 32, x.float(), y.float())
    dead = torch.zeros(2, cfg.d_sae, dtype=torch.bool)
    dead[0, :: every[0]] = True
    dead[1, :: every[1]] = True
    net.last_fired[~dead] = 1000  # seen at the step below: live; the others last fired at step 0, long ago
    pre = net.pre_acts(x.float())
    error = torch.randn(2, pre.shape[1], 32)
    aux = net.aux_loss(net.encoder_matmul(x.float()), error, step=1000)
    aux.backward()
    k_aux = 16
    masked = torch.where(dead[:, None, :], pre, torch.tensor(-1.0)).detach()
    top = masked.topk(k_aux, dim=-1)
    z = torch.zeros_like(masked).scatter(-1, top.indices, torch.relu(top.values))
    expected = (torch.bmm(z, net.W_dec.detach()) - error).pow(2).sum(-1).mean(-1).sum()
    torch.testing.assert_close(aux.detach(), expected, rtol=1e-5, atol=1e-5)
    assert net.W_dec.grad[~dead].abs().max() == 0 and net.W_dec.grad[dead].abs().max() > 0
    net.last_fired.fill_(1000)
    assert net.aux_loss(net.encoder_matmul(x.float()), error, step=1000).item() == 0.0, "no dead features, no auxiliary loss"


def test_curve_ce_recovered_ends_at_the_saved_transcoders_figure(gpt2, text_file, tmp_path):
    """`curve_ce` points measure CE recovered with every layer replaced; the last one is exactly what `eval` of the
    saved transcoders on the same held-out tokens gives (the same calibrated thresholds)."""
    from circuit_catalog.ingest.evaluate import evaluate_transcoders

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=8, curve_ce=2)
    result = train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    measured = [p for p in result.curve if p.ce_recovered is not None]
    assert len(measured) == 2 and measured[-1].step == result.curve[-1].step
    held_out = token_contexts(gpt2.tokenizer, str(text_file), cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)[:cfg.eval_tokens // cfg.ctx_len]
    saved = evaluate_transcoders(gpt2, load_transcoders(tmp_path / "tc"), held_out, progress=False, per_layer=False)
    assert measured[-1].ce_recovered == pytest.approx(saved.ce_recovered_all, abs=1e-5)


def test_bfloat16_matmuls_train_as_well(gpt2, text_file, tmp_path):
    """The encoder's matmuls in bfloat16 (weights in float32): the same run's held-out FVU within 0.03 of float32."""
    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=8)
    fp32 = train_transcoders(gpt2, cfg, tmp_path / "fp32", progress=False)
    bf16 = train_transcoders(gpt2, TrainConfig(**{**cfg.__dict__, "matmul_dtype": "bfloat16"}), tmp_path / "bf16", progress=False)
    assert load_transcoders(tmp_path / "bf16")[0].W_enc.dtype == torch.float32
    assert [m.fvu for m in bf16.metrics] == pytest.approx([m.fvu for m in fp32.metrics], abs=0.03)


def test_a_record_from_before_batchtopk_is_not_reused_for_it(gpt2, text_file, tmp_path):
    """A training record without the method fields was a ReLU + L1 run without a schedule, resampling or outlier
    features (a BatchTopK record without `resample_firing` resampled with the previous start): reused for that, not for
    the BatchTopK defaults."""
    import json

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, activation="relu", warmup=0.0, decay=0.0, l1_coefficient=0.01,
                      resamples=0, outlier_feature=False, resample_firing=None)
    train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    path = tmp_path / "tc" / "training.json"
    record = json.loads(path.read_text())
    for name in ("activation", "warmup", "decay", "matmul_dtype", "k", "aux_coefficient", "dead_tokens", "curve_ce", "resamples",
                 "outlier_feature", "resample_firing"):
        record["config"].pop(name)
    path.write_text(json.dumps(record))
    assert reusable(tmp_path / "tc", cfg) is not None
    assert reusable(tmp_path / "tc", replace(cfg, resamples=6)) is None
    assert reusable(tmp_path / "tc", replace(cfg, outlier_feature=True)) is None
    assert reusable(tmp_path / "tc", replace(cfg, resample_firing=0.25)) is None  # the present start: not these weights
    assert reusable(tmp_path / "tc", TrainConfig(**{**cfg.__dict__, "activation": "batchtopk", "warmup": 0.05, "decay": 0.2})) is None


def test_ingest_keeps_the_training_record_and_the_overview_plots_its_curve(gpt2, text_file, tmp_path):
    """A catalog ingested from trained transcoders carries their training.json; the overview's Training section draws
    one point per curve point (FVU, L0, dead) and the CE recovered where measured, with the values as tooltips."""
    import json
    import re

    from circuit_catalog.catalog import layout
    from circuit_catalog.ingest.job import build_manifest, run_ingest
    from circuit_catalog.ingest.settings import IngestSettings
    from circuit_catalog.queries.reports.overview import write_overview

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=8, curve_ce=1)
    result = train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    tset = load_transcoders(tmp_path / "tc")
    tset.bind(gpt2)
    root = tmp_path / "catalog"
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, str(tmp_path / "tc"), IngestSettings(top_k=2)), progress=False)
    assert json.loads((root / layout.TRAINING).read_text()) == json.loads((tmp_path / "tc" / "training.json").read_text())

    html = write_overview(root).read_text()
    training = html[html.index(">Training<"):]
    for title, n in (("FVU (minibatch)", len(result.curve)), ("L0", len(result.curve)), ("dead features", len(result.curve)),
                     ("CE loss recovered (held-out)", 1)):
        chart = re.search(rf'<svg[^>]*aria-label="{re.escape(title)} during training".*?</svg>', training, re.S).group(0)
        assert chart.count("<circle") == n, title
    ce = result.curve[-1].ce_recovered
    assert f"{ce:.3f}" in re.search(r'aria-label="CE loss recovered \(held-out\) during training".*?</svg>', training, re.S).group(0)
    assert f"BatchTopK, k = {cfg.k}" in training


def test_eval_starts_past_the_training_contexts(gpt2_dir, gpt2, text_file, tmp_path):
    """`eval --skip-contexts auto` (the default) reads the training record: it evaluates on the contexts after those
    the transcoders were trained and checked on, the same figures as naming that count; another dataset starts at 0."""
    from circuit_catalog.ingest.pipeline import evaluate
    from circuit_catalog.ingest.train import trained_contexts

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file), "n_tokens": 1500}, k=8)
    train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    skip = trained_contexts(tmp_path / "tc", str(text_file), cfg.ctx_len)
    used = token_contexts(gpt2.tokenizer, str(text_file), cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)
    assert skip == len(used)
    assert trained_contexts(tmp_path / "tc", "brown", cfg.ctx_len) is None and trained_contexts(tmp_path / "tc", str(text_file), 16) is None
    auto = evaluate(str(gpt2_dir), tmp_path / "tc", str(text_file), 256, cfg.ctx_len, skip_contexts=None, progress=False)
    named = evaluate(str(gpt2_dir), tmp_path / "tc", str(text_file), 256, cfg.ctx_len, skip_contexts=skip, progress=False)
    start = evaluate(str(gpt2_dir), tmp_path / "tc", str(text_file), 256, cfg.ctx_len, skip_contexts=0, progress=False)
    assert auto.ce_original == named.ce_original != start.ce_original


def test_outlier_tokens_neither_set_the_scale_nor_train(gpt2, text_file):
    """With `outlier_factor`, tokens whose target lies that many times the median token's squared distance from the
    mean (massive activations) are left out: the output scale is the other tokens' spread, BatchTopK selects none of
    their activations, and the loss has no gradient through their reconstruction."""
    from circuit_catalog.ingest.train import _StackedTranscoders, _step_loss, collect

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=5, outlier_factor=20.0)
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 512, 32)[:4]
    x, y = collect(gpt2, tokens, cfg)
    x, y = x.float(), y.float()
    massive = torch.zeros(y.shape[:2], dtype=torch.bool)
    massive[0, [3, 40]] = True  # layer 0: two tokens a thousand times the others
    y[massive] *= 1000.0
    net = _StackedTranscoders(cfg, 32, x, y)
    q = (y - y.mean(1, keepdim=True)).pow(2).sum(-1)
    for layer in range(2):
        typical = q[layer] <= 20.0 * q[layer].median()
        assert typical.tolist() == (~massive[layer]).tolist()
        assert net.s_out[layer].item() == pytest.approx(q[layer][typical].mean().sqrt().item(), rel=1e-5)
    y_n = y / net.s_out[:, None, None]
    typical = net.typical(y_n)
    assert typical.tolist() == (~massive).tolist()
    rows, _, _, _ = net.batch_topk(net.encoder_matmul(x), typical=typical)
    assert not massive.reshape(-1)[rows].any(), "no activation of a massive token is selected"
    x_grad = x.clone().requires_grad_()
    loss, _, _ = _step_loss(net, x_grad, y_n, step=0)
    loss.backward()
    assert x_grad.grad[massive].abs().max() == 0 and x_grad.grad[~massive].abs().max() > 0
    # the inference threshold is calibrated as training selects: whatever the massive tokens' inputs, it stays
    thresholds = []
    for scale in (1.0, 1e3):
        x_scaled = torch.where(massive[..., None], x * scale, x)
        net.calibrate(x_scaled.half(), y.half(), batches=4)
        thresholds.append(net.threshold.clone())
    assert thresholds[0].gt(0).all()
    torch.testing.assert_close(thresholds[0], thresholds[1], rtol=0, atol=0)


def test_each_layer_with_outlier_tokens_gets_a_feature_for_them(gpt2, text_file, tmp_path):
    """Training's outlier criterion picks the tokens the fitted feature is for: on layer 0, six tokens whose input
    stands out along one direction and whose output is massive along another get a feature that fires on exactly them;
    layer 2, with no outliers, keeps its features. The record keeps which feature it is."""
    from circuit_catalog.ingest.train import _fit_outlier_features, _StackedTranscoders, collect

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=5)
    x, y = collect(gpt2, token_contexts(gpt2.tokenizer, str(text_file), 512, 32)[:4], cfg)
    x, y = x.float(), y.float()
    g = torch.Generator().manual_seed(0)
    marker, massive = torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)
    tokens = torch.tensor([5, 17, 40, 66, 90, 111])
    x[0, tokens] += (8 + 4 * torch.rand(6, 1, generator=g)) * marker
    y[0, tokens] += 150 * y[0].std() * (x[0, tokens] @ marker)[:, None] * massive
    net = _StackedTranscoders(cfg, 32, x, y)
    transcoders = net.export("tiny")
    layer_2 = transcoders[1].W_enc.clone()
    fitted = _fit_outlier_features(net, transcoders, x.half(), y.half())
    assert list(fitted) == [0]
    fires = transcoders[0].encode(x[0])[:, fitted[0]] > 0
    assert fires.nonzero().squeeze(1).tolist() == tokens.tolist()
    assert torch.equal(transcoders[1].W_enc, layer_2)

    # through training: the tiny model given a sink at position 1 (input shifted along `marker`, output massive)
    def shift(value, hook):
        value[:, 1] += 10 * marker
        return value

    def sink(value, hook):
        value[:, 1] += 1500 * scale * massive
        return value

    scale = y[0].std()
    gpt2.add_perma_hook("blocks.0.ln2.hook_normalized", shift)
    gpt2.add_perma_hook("blocks.0.hook_mlp_out", sink)
    try:
        trained = train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
        plain = train_transcoders(gpt2, replace(cfg, outlier_feature=False), tmp_path / "plain", progress=False)
    finally:
        gpt2.reset_hooks(including_permanent=True)
    assert list(trained.outlier_features) == [0] and plain.outlier_features == {}
    assert reusable(tmp_path / "tc", cfg).outlier_features == trained.outlier_features
    feature = trained.outlier_features[0]
    with_it, without = load_transcoders(tmp_path / "tc")[0], load_transcoders(tmp_path / "plain")[0]
    others = torch.arange(cfg.d_sae) != feature
    assert torch.equal(with_it.W_dec[others], without.W_dec[others]) and abs(with_it.W_dec[feature] @ massive) > 0.99
    assert trained.metrics[0].fvu < 0.1 * plain.metrics[0].fvu and trained.metrics[1] == plain.metrics[1]


def test_resampling_reinitialises_only_dead_features_on_badly_reconstructed_tokens(gpt2, text_file):
    """Features silent since the last resampling take new directions: each decoder row is the unit error of a typical
    token of the sample, the encoder column that token's centred input direction at the live columns' mean norm, firing
    on `resample_firing` of the sample (the tokens furthest along it); their Adam moments are zeroed and their silence
    restarts; every live feature's weights and moments stay bit for bit."""
    from circuit_catalog.ingest.train import (_reset_optimiser_state, _StackedTranscoders, _step_loss, collect,
                                              resample_steps, silent_since)

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, k=5, resamples=2)
    assert resample_steps(replace(cfg, dead_tokens=64), 100) == {27, 53} and resample_steps(replace(cfg, resamples=0), 100) == set()
    # each is followed by two dead windows of training at least: with windows of 24 steps the one at 53 is dropped
    assert resample_steps(replace(cfg, dead_tokens=64 * 24), 100) == {27}
    # silent for the second half of the steps since the previous resampling, and for dead_tokens (2 or 20 steps) at least
    assert silent_since(replace(cfg, dead_tokens=128), 27, 53) == 40 and silent_since(replace(cfg, dead_tokens=64 * 20), 27, 53) == 33
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 512, 32)[:4]
    x, y = collect(gpt2, tokens, cfg)
    x, y = x.float(), y.float()
    net = _StackedTranscoders(cfg, 32, x, y)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    y_n = y / net.s_out[:, None, None]
    loss, _, _ = _step_loss(net, x, y_n, step=0)
    loss.backward()
    optimiser.step()
    dead = torch.zeros(2, cfg.d_sae, dtype=torch.bool)
    dead[0, ::4] = dead[1, 1::7] = True
    net.last_fired[~dead] = 30
    net.last_fired[dead] = 10
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    moments = {name: optimiser.state[p]["exp_avg"].clone() for name, p in net.named_parameters()}
    product = net.encoder_matmul(x)
    rows, features, values, _ = net.batch_topk(product, typical=net.typical(y_n))
    recon = net.decode_sparse(rows, features, values, x.shape[0] * x.shape[1]).reshape(y_n.shape) + net.b_dec + net.skip_path(x)
    errors = torch.nn.functional.normalize(y_n - recon, dim=-1).detach()
    resampled = net.resample(x, y_n, silent_since=20, step=40, draw=torch.Generator().manual_seed(0))
    _reset_optimiser_state(optimiser, net, resampled)
    assert resampled.tolist() == dead.tolist()
    assert (net.last_fired[dead] == 40).all() and (net.last_fired[~dead] == 30).all()
    for layer in range(2):
        f = dead[layer].nonzero().squeeze(1)
        cosines = net.W_dec[layer, f] @ errors[layer].T  # [dead, tokens]
        assert torch.allclose(cosines.max(1).values, torch.ones(len(f)), atol=1e-5), "each is a token's unit error"
        token = cosines.argmax(1)
        x_n = x[layer] / net.s_in[layer]
        columns = net.W_enc[layer, :, f].T  # [dead, d]
        live_norm = before["W_enc"][layer][:, ~dead[layer]].norm(dim=0).mean()
        torch.testing.assert_close(columns.norm(dim=1), live_norm.expand(len(f)))
        direction = torch.nn.functional.normalize(x_n[token] - x_n.mean(0), dim=-1)
        torch.testing.assert_close(torch.nn.functional.normalize(columns, dim=-1), direction)
        along = x_n @ columns.T  # [tokens, dead]
        fires = along + net.b_enc[layer, 0, f] > 0
        assert (fires.sum(0) == round(cfg.resample_firing * x.shape[1])).all(), "each fires on resample_firing of the sample"
        lowest_firing = torch.where(fires, along, torch.inf).min(0).values
        assert (lowest_firing > torch.where(fires, -torch.inf, along).max(0).values).all(), "on the tokens furthest along it"
    for name, p in net.named_parameters():
        mask = {"W_dec": dead[:, :, None], "W_enc": dead[:, None, :], "b_enc": dead[:, None, :]}.get(name)
        if mask is None:
            assert torch.equal(p, before[name])
            continue
        keep = ~mask.expand_as(p)
        assert torch.equal(p[keep], before[name][keep]) and torch.equal(optimiser.state[p]["exp_avg"][keep], moments[name][keep])
        assert optimiser.state[p]["exp_avg"][~keep].abs().max() == 0 and optimiser.state[p]["exp_avg_sq"][~keep].abs().max() == 0


@pytest.mark.parametrize("firing", [None, 0.0, 1.0])
def test_resampling_needs_a_firing_fraction_strictly_between_0_and_1(gpt2, text_file, tmp_path, firing):
    """None is what a record from before the present resampling start reads as: it can be compared, not trained."""
    from circuit_catalog.errors import TranscoderError

    cfg = TrainConfig(**{**BASE, "dataset": str(text_file)}, resample_firing=firing)
    with pytest.raises(TranscoderError, match="resample_firing"):
        train_transcoders(gpt2, cfg, tmp_path / "tc", progress=False)
    assert not (tmp_path / "tc").exists()
