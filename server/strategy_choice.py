"""Pick the aggregation rule named in the run config; Flower's own strategies do the arithmetic."""

from __future__ import annotations

import math

from flwr.serverapp import (
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from common.run_config import RunConfig

UNIFORM_WEIGHT = "client-weight"  # every reply carries it as 1
ADAPTIVE_CLIPPED_COUNT_STDDEV = 2.0  # noise on the clipped-update count (Andrew et al.)


def build_strategy(config: RunConfig) -> Strategy:
    # Flower's sampling blocks, without a timeout, until its minimums are connected: a client that
    # dropped out for good would stall every later round. So its floor is the quorum; the round
    # loop waits for the full federation before the first round (`server.federation.await_clients`).
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_replies,
        "min_evaluate_nodes": config.min_train_replies,
        "min_available_nodes": config.min_train_replies,
    }
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **sampling)
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, **sampling)
    if config.strategy == "fedmedian":
        return FedMedian(**sampling)
    if config.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=config.trim_beta, **sampling)
    if config.strategy == "krum":
        return Krum(num_malicious_nodes=config.num_malicious, **sampling)
    if config.strategy == "multikrum":
        selected = max(1, config.num_clients - config.num_malicious)
        return MultiKrum(
            num_malicious_nodes=config.num_malicious, num_nodes_to_select=selected, **sampling
        )
    if config.strategy == "bulyan":
        return Bulyan(num_malicious_nodes=config.num_malicious, **sampling)
    if config.client_dp:
        return client_level_dp(config, sampling)
    return FedAvg(**sampling)


def client_level_dp(config: RunConfig, sampling: dict) -> Strategy:
    """Clip each client's whole update, add Gaussian noise to the average, account with RDP.

    Every sampled client counts equally (`client-weight` = 1 in each reply): the accountant's
    sensitivity bound holds only for a uniform average, not one weighted by claimed examples.
    Clipping on the client (`client/dp_mods.py`) means the coordinator never receives an
    unclipped update; adaptive clipping learns the norm, but Flower 1.42 gives its wrapper no
    accountant, so such a run reports its noise and norm, not an epsilon.
    """
    average = FedAvg(weighted_by_key=UNIFORM_WEIGHT, **sampling)
    noise, norm = config.client_dp_noise_multiplier, config.client_dp_clipping_norm
    num_sampled = max(1, math.floor(config.num_clients * config.fraction_train))
    if config.client_dp_clipping == "adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            average,
            noise_multiplier=noise,
            num_sampled_clients=num_sampled,
            initial_clipping_norm=norm,
            # Flower's default (clients / 20) must exceed noise / 2 or the wrapper raises.
            clipped_count_stddev=max(ADAPTIVE_CLIPPED_COUNT_STDDEV, noise),
        )
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.target_delta,
            population_size=config.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=config.client_dp_max_epsilon,
        )
    )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if config.client_dp_clipping == "client"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        average,
        noise_multiplier=noise,
        clipping_norm=norm,
        num_sampled_clients=num_sampled,
        accountant=accountant,
    )
