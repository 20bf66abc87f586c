"""`python -m server.kernels` builds the CPU kernels once (`make test` does, before the first server starts)."""
import logging

from server.kernels import cpu, log

logging.basicConfig(level=logging.INFO)
log.info("CPU kernels: %s", "built" if cpu() is not None else "unavailable (torch paths)")
