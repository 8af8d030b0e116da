"""One feature per layer for the massive-activation tokens that training leaves out (`TrainConfig.outlier_factor`).

In SmolLM2 a few tokens at position 1 (about one context in ten) become a second attention sink: layer 11's MLP writes
an output ~15,000 long along one direction, and layer 28's takes it out again. Training leaves them out (their squared
error would drown every other token's), so they fell to the error term, and with them more than 99% of those layers'
variance (FVU ~0.99 where the other tokens' is ~0.3). Their outputs lie along one direction and their inputs are
linearly separable from the other tokens', so one JumpReLU feature, fitted in closed form after training, carries them:
its decoder row is the main direction of their residuals, its encoder a weighted ridge regression of their coefficient
along it (0 on every other token), its threshold the one that removes the most squared error on the training buffer
while firing on none of the other tokens there. It takes the slot of the feature that fires least, so the rest of the
transcoder is untouched.
"""

from __future__ import annotations

import torch

from circuit_catalog.ingest.transcoder import Transcoder

MIN_OUTLIERS = 4  # fewer outlier tokens in the buffer than this: too few to fit a direction and an encoder on
RIDGE = 1e-3  # the encoder's ridge penalty, relative to the mean diagonal of the weighted Gram matrix
CHUNK = 4096  # tokens per pass over the buffer


@torch.no_grad()
def fit_outlier_feature(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, outlier: torch.Tensor) -> int | None:
    """Re-purpose the least-firing feature of JumpReLU transcoder `tc` (in place) to reconstruct the `outlier` tokens
    [N] of its inputs `x` and targets `y` [N, d] (raw units, any float dtype) -> its index, or None when there are fewer
    than MIN_OUTLIERS of them, or no threshold makes the feature remove squared error."""
    if tc.cfg.activation != "jumprelu" or int(outlier.sum()) < MIN_OUTLIERS:
        return None
    dtype, device = tc.W_enc.dtype, tc.W_enc.device
    chunks = [(x[i : i + CHUNK].to(device, dtype), slice(i, i + CHUNK)) for i in range(0, len(x), CHUNK)]
    fired = sum((tc.encode(xc) > 0).sum(0) for xc, _ in chunks)
    slot = int(torch.argmin(fired))  # the first of the least firing
    old_dec = tc.W_dec[slot].clone()
    tc.W_dec[slot] = 0.0  # the residuals below are those of the transcoder without it
    mask = outlier.to(device)
    x_out, y_out = x[outlier].to(device, dtype), y[outlier].to(device, dtype)
    residual = y_out - tc.decode(tc.encode(x_out), x_out)
    direction = torch.linalg.svd(residual, full_matrices=False).Vh[0]
    if (residual @ direction).mean() < 0:
        direction = -direction
    # encoder: pre = x w + b ~ the outliers' coefficient along `direction`, 0 elsewhere; the outliers weighted up so both
    # groups weigh the same in the fit
    n_out = int(mask.sum())
    weight = torch.where(mask, (len(x) - n_out) / n_out, 1.0).to(dtype)
    target = torch.zeros(len(x), device=device, dtype=dtype)
    target[mask] = residual @ direction
    gram = torch.zeros(x.shape[1] + 1, x.shape[1] + 1, device=device, dtype=torch.float64)
    moment = torch.zeros(x.shape[1] + 1, device=device, dtype=torch.float64)
    for xc, at in chunks:
        xa = torch.cat([xc, torch.ones(len(xc), 1, device=device, dtype=dtype)], 1).double()
        gram += (xa * weight[at, None]).T @ xa
        moment += (xa * weight[at, None]).T @ target[at].double()
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), device=device, dtype=torch.float64)
    solution = torch.linalg.solve(gram, moment).to(dtype)
    w, b = solution[:-1], solution[-1]
    # threshold: firing with activation p on a token whose residual is r changes its squared error by p^2 - 2 p (r . u);
    # the best threshold keeps the prefix (by p, descending) whose summed change is most negative, among the prefixes
    # of outliers only: firing on an ordinary token writes a massive vector where none belongs (on layer 2's " the"
    # tokens, which are large but no sink, allowing it cost more next-token loss than the feature saved)
    # (those prefixes hold outliers only, whose r . u is their `target`: no other token's residual is needed)
    pre = torch.cat([xc @ w + b for xc, _ in chunks])
    order = pre.argsort(descending=True)
    ordinary = (~mask[order]).nonzero()
    prefix = int(ordinary[0]) if len(ordinary) else len(order)
    top = order[:prefix]
    change = (pre[top].pow(2) - 2 * pre[top] * target[top]).double().cumsum(0)
    best = int(change.argmin()) if prefix else 0
    if not prefix or change[best] >= 0 or pre[order[best]] <= 0:
        tc.W_dec[slot] = old_dec
        return None
    below = pre[order[best + 1]] if best + 1 < len(order) else pre[order[best]] / 2
    tc.W_enc[:, slot], tc.b_enc[slot], tc.W_dec[slot] = w, b, direction
    tc.threshold[slot] = (pre[order[best]] + below.clamp_min(0)) / 2
    return slot
