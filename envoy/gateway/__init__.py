"""The Envoy gateway in front of the chat replicas.

The parts, each in its own module:

- `settings`: `GatewaySettings`, typed from `CHATMESH_GATEWAY_*` environment variables;
- `api`: ChatService's gRPC paths, streaming methods and REST bindings, read from the descriptor set
  shipped in this package (`data/chatmesh.pb`, written by `make protos`);
- `config`: the Envoy bootstrap rendered from both, composed of one module per concern: `routes`,
  `filters` (with `jwks` and `rest_errors`, whose Lua program is `rest_errors.lua`), `local_replies`,
  `clusters`, `tracing`, `metrics`; `envoy_json` holds the small shapes they share;
- `openapi`: the REST API's OpenAPI document (`data/openapi.json`, written by `make protos`), with what
  the descriptor set cannot say in `openapi_schemas`;
- `validate`: the Envoy binary and `envoy --mode validate`;
- `process`: running Envoy (`run_envoy`) and reading its admin interface;
- `cli`: `python -m gateway [--print | --validate]`.
"""

from gateway.api import CHAT_SERVICE, ServiceApi, default_descriptor_path
from gateway.config import build_envoy_config, render_envoy_config
from gateway.filters import USER_HEADER
from gateway.jwks import jwks
from gateway.process import EnvoyProcess, run_envoy
from gateway.settings import GatewaySettings
from gateway.validate import envoy_binary, validate_config, validate_settings

__all__ = [
    "CHAT_SERVICE",
    "USER_HEADER",
    "EnvoyProcess",
    "GatewaySettings",
    "ServiceApi",
    "build_envoy_config",
    "default_descriptor_path",
    "envoy_binary",
    "jwks",
    "render_envoy_config",
    "run_envoy",
    "validate_config",
    "validate_settings",
]
