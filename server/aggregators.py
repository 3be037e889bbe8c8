"""The aggregation rule behind the update guard: Flower's FedAvg, FedMedian, FedTrimmedAvg or Krum (federation.aggregator),
wrapped in Flower's central-DP wrapper (client-side fixed clipping, server-side Gaussian noise) when DP is on.

Only `aggregate_train` of the returned strategy is used: sampling, configuration and evaluation stay with
server.strategy.EdgeFedAvg, which screens every reply before handing the kept ones over.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

from common.config import ExperimentConfig, dp_enabled, sampled_per_round


def build_aggregator(cfg: ExperimentConfig) -> Strategy:
    """The configured aggregation strategy (config validation guarantees DP only with fedavg)."""
    fed = cfg.federation
    if fed.aggregator == "fedmedian":
        return FedMedian()
    if fed.aggregator == "fedtrimmedavg":
        return FedTrimmedAvg(beta=fed.trim_beta)
    if fed.aggregator == "krum":
        return Krum(num_malicious_nodes=fed.krum_malicious)
    if not dp_enabled(cfg):
        return FedAvg()
    return DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), fed.dp_noise_multiplier, fed.dp_clipping_norm, num_sampled_clients=sampled_per_round(cfg)
    )
