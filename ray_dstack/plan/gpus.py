"""GPU models, their memory, and the Ray accelerator type (node label value) each one shows up as.

Ray type names come from `ray/util/accelerators/accelerators.py` and from what Ray 2.60 auto-detects
(`_gpu_name_to_accelerator_type`: "NVIDIA A10G" → "A10G", "NVIDIA RTX A6000" → "RTX-A6000",
"NVIDIA GeForce RTX 4090" → "GeForce-RTX-4090"). Ray auto-labels every A100 as plain "A100" whatever its
memory, so memory-based specs admit only the distinct "A100-40G" / "A100-80G" types: label A100 nodes with
those explicitly (cluster.yaml does). A spec that names A100 admits all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_dstack.config.models.resources import GPUSpec


@dataclass(frozen=True)
class GPUModel:
    name: str  # dstack's name, as users write it in `gpu: NAME`
    vendor: str
    memory_gb: float
    ray_type: str  # value of the `ray.io/accelerator-type` node label
    compute_capability: float | None = None


GPU_MODELS: tuple[GPUModel, ...] = (
    GPUModel("K80", "nvidia", 12, "K80", 3.7),
    GPUModel("P4", "nvidia", 8, "P4", 6.1),
    GPUModel("P100", "nvidia", 16, "P100", 6.0),
    GPUModel("T4", "nvidia", 16, "T4", 7.5),
    GPUModel("V100", "nvidia", 16, "V100", 7.0),
    GPUModel("V100", "nvidia", 32, "V100", 7.0),
    GPUModel("A10", "nvidia", 24, "A10", 8.6),
    GPUModel("A10G", "nvidia", 24, "A10G", 8.6),
    GPUModel("L4", "nvidia", 24, "L4", 8.9),
    GPUModel("RTX4090", "nvidia", 24, "GeForce-RTX-4090", 8.9),
    GPUModel("RTX3090", "nvidia", 24, "GeForce-RTX-3090", 8.6),
    GPUModel("A40", "nvidia", 48, "A40", 8.6),
    GPUModel("A6000", "nvidia", 48, "RTX-A6000", 8.6),
    GPUModel("L40", "nvidia", 48, "L40", 8.9),
    GPUModel("L40S", "nvidia", 48, "L40S", 8.9),
    GPUModel("A100", "nvidia", 40, "A100-40G", 8.0),
    GPUModel("A100", "nvidia", 80, "A100-80G", 8.0),
    GPUModel("H100", "nvidia", 80, "H100", 9.0),
    GPUModel("H100NVL", "nvidia", 94, "H100-NVL", 9.0),
    GPUModel("H20", "nvidia", 96, "H20", 9.0),
    GPUModel("RTXPRO6000", "nvidia", 96, "RTX-PRO-6000", 12.0),
    GPUModel("H200", "nvidia", 141, "H200", 9.0),
    GPUModel("B200", "nvidia", 192, "B200", 10.0),
    GPUModel("MI300X", "amd", 192, "AMD-Instinct-MI300X-OAM"),
    GPUModel("MI325X", "amd", 256, "AMD-Instinct-MI325X-OAM"),
)

# Plain "A100" is what Ray auto-detects for either memory size: admitted when the spec names A100.
_NAME_EXTRA_TYPES = {"a100": ("A100",)}


def _norm(name: str) -> str:
    return name.replace("-", "").replace(" ", "").lower()


def known_names() -> list[str]:
    return sorted({m.name for m in GPU_MODELS})


def admitted_types(gpu: GPUSpec) -> list[str] | None:
    """Ray accelerator types that satisfy a GPU spec; `None` means any GPU will do (no constraint)."""
    # A vendor alone does not constrain: Ray's `GPU` resource already means an accelerator of the cluster.
    if not (gpu.name or gpu.memory or gpu.total_memory or gpu.compute_capability):
        return None
    names = {_norm(n) for n in gpu.name} if gpu.name else None
    vendor = {"tpu": "google"}.get(gpu.vendor or "", gpu.vendor)
    count_min = gpu.count.min or 1
    types: list[str] = []
    for model in GPU_MODELS:
        if vendor and model.vendor != vendor:
            continue
        if names is not None and _norm(model.name) not in names and _norm(model.ray_type) not in names:
            continue
        if gpu.memory and not gpu.memory.contains(model.memory_gb):
            continue
        if gpu.total_memory:
            counts = range(count_min, (gpu.count.max or count_min) + 1)
            if not any(gpu.total_memory.contains(model.memory_gb * c) for c in counts):
                continue
        if gpu.compute_capability:
            if model.compute_capability is None or model.compute_capability < float(gpu.compute_capability):
                continue
        if model.ray_type not in types:
            types.append(model.ray_type)
    if names is not None and not gpu.memory and not gpu.total_memory:
        for n in names:
            for extra in _NAME_EXTRA_TYPES.get(n, ()):
                if extra not in types:
                    types.append(extra)
    return types


def memory_of(ray_type: str) -> list[float]:
    return sorted({m.memory_gb for m in GPU_MODELS if m.ray_type == ray_type})
