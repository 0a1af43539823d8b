"""Pure mapping of a `ServiceConfig` onto Ray Serve: `build_plan(...) -> ServicePlan`."""

from ray_dstack.plan.gpus import GPU_MODELS, admitted_types
from ray_dstack.plan.plan import PlanError, ServicePlan, build_plan, is_secret_key

__all__ = ["GPU_MODELS", "admitted_types", "PlanError", "ServicePlan", "build_plan", "is_secret_key"]
