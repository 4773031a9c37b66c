"""The client half of SecAgg+: when the run asks for it, the trained model leaves this site masked.

Flower 1.42's `secaggplus_mod` speaks only the legacy records (`fitins.*` in, `fitres.*` out), while
the train handler reads and writes the Message API's (`arrays`, `config`; `arrays`, `metrics`). This
mod translates on the way in and on the way out, so there is one training code path (plain or
DP-SGD) with or without secure aggregation, and masking happens after DP-SGD's clipping and noise.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.site_inputs import site_run_config
from common.federated_model import federated_layout
from common.run_config import RunConfig
from common.tasks import task_schema

LEGACY_PARAMETERS = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"


class SecureRoundRefused(RuntimeError):
    """The site will not take part in this secure round; the SuperNode replies with this error."""


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Attached to the train handler only; runs without secagg pass straight through."""
    if not context.run_config.get("secagg"):
        return call_next(msg, context)
    config = site_run_config(context)

    def train_legacy(legacy: Message, node_context: Context) -> Message:
        legacy.content = _as_train_content(legacy.content, config)
        reply = call_next(legacy, node_context)
        if reply.has_error():  # a DP refusal (budget, ledger) must not look like a dropout
            raise SecureRoundRefused(reply.error.reason)
        return Message(_fit_res(reply.content, config.secagg_max_weight), reply_to=legacy)

    return secaggplus_mod(msg, context, train_legacy)


@lru_cache(maxsize=2)
def _parameter_names(config: RunConfig) -> tuple[str, ...]:
    """Built once per process, not once per secure round: only the names are wanted."""
    return tuple(federated_layout(task_schema(config), config))


def _as_train_content(legacy: RecordDict, config: RunConfig) -> RecordDict:
    """Legacy parameters are an unnamed list in state-dict order; the model gives back the names."""
    names = _parameter_names(config)
    arrays = [bytes_to_ndarray(array.data) for array in legacy[LEGACY_PARAMETERS].values()]
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {name: Array(array) for name, array in zip(names, arrays, strict=True)}
            ),
            "config": ConfigRecord(dict(legacy[LEGACY_CONFIG])),
        }
    )


def _fit_res(content: RecordDict, max_weight: int) -> RecordDict:
    """The handler's reply as the FitRes that `secaggplus_mod` quantizes and masks.

    The mod weights the model by num-examples / max-weight; a heavier client would overflow the
    masked sum or be clipped, so it is refused with the setting that fixes it."""
    metrics = dict(content["metrics"])
    num_examples = int(metrics["num-examples"])
    if num_examples > max_weight:
        raise SecureRoundRefused(
            f"{num_examples} training examples exceed secagg-max-weight = {max_weight}; "
            f"raise it to at least {num_examples}"
        )
    arrays = [array.numpy() for array in content["arrays"].values()]
    return fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, metrics),
        keep_input=False,
    )
