"""Which (strategy, method, hardware) combinations can work. (helper-2 owns this file.)"""


def check_compatibility(strategy: str, method: str, *, use_gpu: bool, cpu_offload: bool, mixed_precision: str) -> list[str]:
    return []
