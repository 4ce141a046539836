"""What the benchmarks print about the machine they ran on."""

import platform


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what Python's platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
