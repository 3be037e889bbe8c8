"""The (epsilon, delta) of a DP federation, from Google's dp-accounting RDP accountant (no hand-written accounting).

Each round releases one Gaussian mechanism (noise multiplier sigma on the mean of clipped client updates,
client-level sensitivity) over a sample of q = sampled / num_clients of the clients; `rounds` of them compose.
Flower samples a fixed number of clients without replacement; the Poisson-sampling bound used here is the
standard approximation for that (exact when q = 1, i.e. fraction_train = 1).
"""

from __future__ import annotations

from dp_accounting import dp_event, rdp

from common.config import ExperimentConfig, dp_enabled, sampled_per_round


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` Poisson-sampled Gaussian releases at rate `sampling_rate`, reported at `delta`."""
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def privacy_report(cfg: ExperimentConfig) -> dict[str, float] | None:
    """{"epsilon", "delta", "noise_multiplier", "clipping_norm", "sampling_rate", "rounds"}; None when DP is off."""
    fed = cfg.federation
    if not dp_enabled(cfg):
        return None
    q = min(1.0, sampled_per_round(cfg) / cfg.split.num_clients)
    return {
        "epsilon": dp_epsilon(fed.dp_noise_multiplier, q, fed.rounds, fed.dp_delta),
        "delta": fed.dp_delta,
        "noise_multiplier": fed.dp_noise_multiplier,
        "clipping_norm": fed.dp_clipping_norm,
        "sampling_rate": q,
        "rounds": fed.rounds,
    }
