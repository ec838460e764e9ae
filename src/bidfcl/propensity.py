"""The OBS logging policy estimated from the log itself, for inverse-propensity weights.

OBS rarely records its propensities; ``tsm-ips`` re-weights the factual loss by 1 / p
estimated here, clipped from below so that a few rows cannot dominate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bidfcl.contract import LoggedData


def fit_propensity_model(
    data: LoggedData, steps: int = 200, l2: float = 1e-4
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression of the logged arm on standardised features.

    Full-batch L-BFGS (deterministic on CPU). Returns a function mapping raw features
    (N, d) to arm probabilities (N, M).
    """
    mean, std = data.x.mean(dim=0), data.x.std(dim=0).clamp_min(1e-6)
    features = (data.x - mean) / std
    linear = torch.nn.Linear(features.shape[1], data.n_treatments)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(features), data.treatment)
        loss = loss + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    linear.requires_grad_(False)
    return lambda x: torch.softmax(linear((x - mean) / std), dim=1)


def ips_weights(data: LoggedData, clip: float, steps: int) -> torch.Tensor:
    """1 / p(logged arm | x) from a propensity model fitted on ``data`` itself, p >= clip.

    Raises ValueError rather than return a non-finite weight: one would turn every loss it
    touches into NaN, and training would go on to save a model that learned nothing.
    """
    probabilities = fit_propensity_model(data, steps)(data.x)
    logged = probabilities.gather(1, data.treatment.unsqueeze(1)).squeeze(1)
    weights = 1.0 / logged.clamp(min=clip, max=1.0)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(
            "the propensity model fitted for IPS weights gave non-finite probabilities "
            "(non-finite features, or a diverged L-BFGS fit): refusing to train on them"
        )
    return weights
