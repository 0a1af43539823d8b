"""The OpenAI-compatible layer: wire models (`protocol`), errors (`errors`), the TGI adapter (`tgi`), the
OpenAI passthrough (`openai_passthrough`), per-service serving logic (`service`) and FastAPI glue
(`router`). Pure async Python; the Ray Serve deployments wrap it.
"""

from ray_dstack.openai.endpoint import GatewayResponse, ModelEndpoint
from ray_dstack.openai.errors import OpenAIError, to_openai_error

__all__ = ["GatewayResponse", "ModelEndpoint", "OpenAIError", "to_openai_error"]
