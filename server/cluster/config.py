"""ClusterSettings: the single server's Settings plus where and how many replicas run."""
from __future__ import annotations

from pydantic import Field

from server.config import Settings


class ClusterSettings(Settings):
    replicas: int = Field(2, ge=1, description="replicas, each with its own copy of the base model")
    ray_address: str | None = Field(None, description="Ray cluster to join (e.g. auto); default: start a local one")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica (1 for a GPU each)")
    metrics_port: int = Field(9400, ge=0, description="replica k exports metrics on this port + k per node (0: off)")

    def replica_settings(self) -> dict:
        """What each replica's own Settings get: paths made absolute (replicas run elsewhere), no host/port."""
        given = self.model_dump(mode="json", include=set(Settings.model_fields) - {"host", "port"})
        given["store"] = str(self.store.resolve())
        given["model"] = str(self.model.resolve()) if self.model else None
        return given
