"""`flwr`, Flower's own CLI, with the operator credential on every Control API request.

Run as `python -m server.coordinator.operator_cli ARGS` by flwr_control.py; the credential file is named
in the environment (operator_credential.py). Everything else is Flower's CLI unchanged.
"""

from __future__ import annotations

from typing import Any

from server.coordinator.operator_credential import HEADER, credential_from_environment


def main() -> None:
    from flwr.cli import cli_client_interceptor
    from flwr.cli.app import app

    credential = credential_from_environment()
    interceptor = cli_client_interceptor.CliClientHttpInterceptor
    intercept = interceptor.intercept

    def with_credential(self: Any, context: Any, call_next: Any) -> Any:
        context.request.headers[HEADER] = credential
        return intercept(self, context, call_next)

    interceptor.intercept = with_credential  # type: ignore[method-assign]
    app(prog_name="flwr")


if __name__ == "__main__":
    main()
