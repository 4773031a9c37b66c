"""Secure aggregation (SecAgg+): the coordinator learns the weighted average, never one site's model.

Flower 1.42 runs SecAgg+ only on its legacy path: `SecAggPlusWorkflow` drives a legacy `Strategy`
through a `LegacyContext` (the Message-API `FedAvg` with `secaggplus_mod` fails every client with
`KeyError: 'secaggplus_configs'` while the run "finishes"). This module drives the workflow's four
stages for one round, so evaluation, checkpoints and metrics stay with Confide's round loop
(server/federation.py). Flower's workflow only logs "Secure aggregation halted." when too many
clients drop out; here that stops the run with a FederationError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import FitRes, Parameters, Scalar, bytes_to_ndarray
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from common.run_config import RunConfig
from server.federation_error import FederationError

log = logging.getLogger(__name__)


class UnmaskedAverage(LegacyFedAvg):
    """FedAvg's sampling; its aggregation keeps what the protocol unmasked.

    The workflow hands `aggregate_fit` one FitRes per contributor, each already holding the same
    weighted average (the only model the coordinator ever sees), so averaging them again would only
    add rounding. It keeps each contributor's training metrics (epsilon, for DP) for the record."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_metrics: dict[int, MetricRecord] = {}

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.train_metrics = {
            int(proxy.node_id): MetricRecord(dict(fit.metrics)) for proxy, fit in results
        }
        return (results[0][1].parameters if results else None), {}


@dataclass(frozen=True)
class SecureRound:
    arrays: ArrayRecord
    train_metrics: dict[int, MetricRecord]
    failures: list[dict[str, Any]]


class SecureAggregation:
    """One SecAgg+ workflow and its legacy state, reused for every round of a run."""

    def __init__(self, grid: Grid, context: Context, config: RunConfig, minimum: int = 1) -> None:
        self.grid = grid
        self.minimum = minimum
        self.strategy = UnmaskedAverage(
            fraction_fit=config.fraction_train,
            fraction_evaluate=0.0,  # evaluation stays Confide's: it needs no secrecy
            min_fit_clients=max(2, minimum),
            min_available_clients=2,
            on_fit_config_fn=lambda server_round: {"server-round": server_round},
        )
        self.legacy = LegacyContext(
            context,
            ServerConfig(num_rounds=config.num_server_rounds),
            self.strategy,
            SimpleClientManager(),
        )
        self.workflow = SecAggPlusWorkflow(
            num_shares=config.secagg_num_shares,
            reconstruction_threshold=config.secagg_reconstruction_threshold,
            max_weight=config.secagg_max_weight,
            clipping_range=config.secagg_clipping_range,
            quantization_range=config.secagg_quantization_range,
            timeout=config.round_timeout,
        )

    def train(self, arrays: ArrayRecord, server_round: int) -> SecureRound:
        """Sample, train and securely average one round; raises FederationError if it halts."""
        connected = self._register_connected_nodes()
        if connected < 2:  # the legacy sampler would otherwise wait a day for a second client
            raise FederationError(
                f"round {server_round}: secure aggregation needs at least 2 connected clients, "
                f"{connected} connected"
            )
        self.strategy.train_metrics = {}
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round}
        )
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = arrays
        state = WorkflowState()
        stages = {
            "setup": self.workflow.setup_stage,
            "share keys": self.workflow.share_keys_stage,
            "collect masked vectors": self.workflow.collect_masked_vectors_stage,
            "unmask": self.workflow.unmask_stage,
        }
        for name, stage in stages.items():
            if not stage(self.grid, self.legacy, state):
                raise FederationError(
                    f"round {server_round}: secure aggregation halted at its '{name}' stage "
                    f"({_shortfall(state)})"
                )
        contributors = set(self.strategy.train_metrics)
        if len(contributors) < self.minimum:
            raise FederationError(
                f"round {server_round}: only {len(contributors)} clients contributed to the "
                f"secure sum, fewer than min-train-replies = {self.minimum}"
            )
        # Flower's workflow keeps failures without their node: each dropout gets every reason.
        reasons = sorted({_reason(failure) for failure in state.failures}) or ["no reply"]
        failures = [
            {"id": node, "reason": "; ".join(reasons), "stage": "train"}
            for node in sorted(state.sampled_node_ids - contributors)
        ]
        average = self.legacy.state.array_records[MAIN_PARAMS_RECORD]
        return SecureRound(_named(average, arrays), self.strategy.train_metrics, failures)

    def _register_connected_nodes(self) -> int:
        """The legacy strategy samples from a ClientManager; the Grid knows who is connected."""
        manager = self.legacy.client_manager
        connected = set(self.grid.get_node_ids())
        for proxy in list(manager.all().values()):
            if int(proxy.node_id) not in connected:
                manager.unregister(proxy)
        for node in connected:
            manager.register(GridClientProxy(node, self.grid, self.legacy.run_id))
        return len(connected)


def _named(average: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Legacy parameters are an unnamed list in the order they were sent."""
    values = [bytes_to_ndarray(array.data) for array in average.values()]
    return ArrayRecord(
        {name: Array(value) for name, value in zip(reference.keys(), values, strict=True)}
    )


def _reason(failure: BaseException) -> str:
    error = failure.args[0] if failure.args else failure
    reason = str(getattr(error, "reason", error) or "no reason given").strip().splitlines()
    return reason[-1] if reason else "no reason given"


def _shortfall(state: WorkflowState) -> str:
    reasons = "; ".join(sorted({_reason(failure) for failure in state.failures}))
    return (
        f"{len(state.active_node_ids)} of {len(state.sampled_node_ids)} sampled clients left, "
        f"each needs {state.threshold} live neighbours (secagg-reconstruction-threshold)"
        + (f"; {reasons}" if reasons else "")
    )
