"""Settings: the only place that reads the environment (`HOTSWAP_<FLAG>`); flags mirror the fields."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", protected_namespaces=())

    model: Path | None = Field(None, description="base model folder (Hugging Face layout); default: the embedded model")
    store: Path = Field(Path("adapters_store"), description="adapter store folder")
    shared_store: bool = Field(False, description="other servers share the store folder (a cluster): re-read it before use")
    store_poll_s: float = Field(5.0, ge=0, description="shared store: also re-read it this often, for metrics, memory and pins (0: off)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    onednn_linear: bool = Field(True, description="CPU fp32: run linear layers through oneDNN (faster than MKL)")
    threads: int = Field(0, description="torch CPU threads of the engine thread; every other thread runs on one (0: torch's default)")
    adapter: list[str] = Field(default_factory=list, description="NAME=DIR adapter to register at start (repeatable)")
    examples: bool = Field(True, description="embedded model: register the example adapters when the store is new")
    max_batch_size: int = Field(32, ge=1, description="rows decoded together")
    max_batch_tokens: int = Field(65536, ge=16, description="KV positions the running rows may reserve")
    max_prefill_tokens: int = Field(4096, ge=16, description="padded tokens in one prefill forward")
    prefill_chunk_tokens: int = Field(0, ge=0, description="prompts longer than this are prefilled one chunk per "
                                      "decode step (0: 32 on CPU, 512 on CUDA)")
    cuda_graphs: bool = Field(True, description="CUDA: decode steps without bottleneck or aLoRA rows replay "
                              "captured graphs")
    kv_block_tokens: int = Field(16, ge=1, le=1024, description="positions per KV-cache block (paged cache)")
    max_waiting: int = Field(256, ge=1, description="queued requests before 429")
    max_new_tokens_limit: int = Field(4096, ge=1, description="largest max_new_tokens a request may ask")
    phase_quantum_s: float = Field(2.0, gt=0, description="longest a phase keeps admitting while others wait")
    prefix_cache: bool = Field(True, description="reuse soft-prompt KV entries across requests")
    prompt_cache: bool = Field(True, description="reuse the KV of prompt starts another request computed "
                               "(full blocks, same adapter; an aLoRA's before its invocation: the base's)")
    max_resident_adapters: int = Field(64, ge=1, description="adapters kept on the device at once")
    max_adapter_memory_bytes: int = Field(0, ge=0, description="device memory for adapters (0: unbounded)")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1, description="largest adapter upload")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body but uploads (413 past it)")
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's headers (408 past it)")
    body_timeout_s: float = Field(30.0, gt=0, description="time a request body has to arrive whole; an upload: its next bytes (408 past it)")
    allowed_local_dir: Path | None = Field(None, description="folder that /v1/load_lora_adapter may read")
    admin_token: str | None = Field(None, description="bearer token for endpoints that change adapters")
    api_key: str | None = Field(None, description="bearer token for generation endpoints")
    metrics_per_adapter_limit: int = Field(0, ge=0, description="adapters with their own metric series (0: off)")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="bounded wait for in-flight requests on SIGTERM")
    log_level: str = Field("info", description="debug | info | warning | error")
