"""Node configuration: defaults < YAML file < MYCELLM_* environment < command-line flags."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mycellm.errors import ConfigError

BUNDLED_MODEL = "smollm2"
Backend = Literal["llama_cpp", "openai", "vllm"]
Tier = Literal["frontier", "capable", "fast", "tiny"]


# Credits per 1,000 tokens by tier; prompt tokens cost a quarter of completion tokens (they are
# processed in parallel, completion tokens one at a time).
DEFAULT_TIER_PRICES: dict[str, float] = {"tiny": 0.02, "fast": 0.1, "capable": 0.5, "frontier": 2.0}


class PriceSettings(BaseModel):
    """The price table in config (``credits:`` section); every node of a network must agree on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier_prices: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIER_PRICES))
    unknown_tier_price: float = Field(default=0.1, ge=0)
    model_prices: dict[str, float] = Field(default_factory=dict)  # per-model override, credits / 1k tokens
    prompt_weight: float = Field(default=0.25, ge=0, le=1)
    relay_fee: float = Field(default=0.10, ge=0, lt=0.5)
    initial_grant: float = Field(default=100.0, ge=0)
    # A request with no max_tokens is admitted (priced, and bounded) at the room its model's context
    # leaves, at most this many completion tokens.
    admission_max_tokens: int = Field(default=4096, ge=1)
    # Reputation and the freeloader policy: a peer that has consumed more than grace_credits from
    # this node, and more than max_consume_ratio times what it served this node, is refused.
    reputation_half_life_s: float = Field(default=7 * 86400, gt=0)
    grace_credits: float = Field(default=10.0, ge=0)
    max_consume_ratio: float = Field(default=4.0, gt=0)
    # A receipt not offered this long after a request was served counts as missed, and the work as
    # consumed unpaid (in the freeloader policy above).
    receipt_deadline_s: float = Field(default=60.0, gt=0)


class ModelSettings(BaseModel):
    """One model entry: a local GGUF (llama.cpp), an OpenAI-compatible upstream, or vLLM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    backend: Backend = "llama_cpp"
    path: str = BUNDLED_MODEL
    context_tokens: int = Field(default=2048, ge=16, le=1_048_576)
    threads: int | None = Field(default=None, ge=1, le=1024)
    batch_tokens: int = Field(default=512, ge=1)
    # Sequences one llama.cpp context decodes together (continuous batching); None: the engine picks.
    parallel: int | None = Field(default=None, ge=1, le=64)
    gpu_layers: int = Field(default=-1, ge=-1)
    embeddings: bool = True
    chat_template: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    upstream_models: tuple[str, ...] = ()
    timeout_s: float = Field(default=120.0, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)  # vLLM: GPUs one worker spans
    tier: Tier | None = None
    tags: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_backend_fields(self) -> ModelSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        if self.backend == "vllm" and self.path == BUNDLED_MODEL:
            raise ValueError("backend 'vllm' needs path: a Hugging Face model id or a local model folder")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return self

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None


def _check_network(cidr: str) -> str:
    """A CIDR such as 127.0.0.0/8 or fc00::/7 (host bits may be set)."""
    ipaddress.ip_network(cidr, strict=False)  # ValueError names it
    return cidr


class AuthSettings(BaseModel):
    """Who may call the HTTP API (``auth:`` section): anonymous callers, and the lockout of failing sources."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Unset: anonymous callers only on a loopback host while no API key exists; true/false overrides.
    allow_anonymous: bool | None = None
    anonymous_scopes: tuple[Literal["inference", "read", "admin"], ...] = ("inference", "read", "admin")
    # lockout_failures refused credentials from one address within lockout_window_s lock it out for
    # lockout_s (0 failures: no lockout, e.g. behind a proxy); at most lockout_max_sources addresses tracked.
    lockout_failures: int = Field(default=10, ge=0, le=1_000_000)
    lockout_window_s: float = Field(default=60.0, gt=0, le=86400)
    lockout_s: float = Field(default=60.0, gt=0, le=86400)
    lockout_max_sources: int = Field(default=10_000, ge=1, le=1_000_000)


class NodeSettings(BaseSettings):
    """Everything a node reads at start; frozen and passed down, never read again from the env."""

    model_config = SettingsConfigDict(
        env_prefix="MYCELLM_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    host: str = "127.0.0.1"
    port: int = Field(default=8420, ge=1, le=65535)
    quic_port: int = Field(default=8421, ge=0, le=65535)  # 0: any free port
    data_dir: Path = Path("~/.mycellm")
    model: str | None = None
    models: tuple[ModelSettings, ...] = (ModelSettings(),)
    database_url: str | None = None
    ray_address: str | None = None
    ray_dashboard: bool = True
    ray_dashboard_port: int = Field(default=8265, ge=1, le=65535)
    ray_temp_dir: Path | None = None
    ray_namespace: str = Field(default="mycellm", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    cluster_poll_s: float = Field(default=5.0, ge=0.2, le=3600)  # joined to a cluster: look for machines
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    request_timeout_s: float = Field(default=600.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    # A peer silent this long mid-answer (or longer, at the stream's pace) is probed; no pong: failover.
    stall_floor_s: float = Field(default=1.0, gt=0, le=60)
    stream_interval_s: float = Field(default=0.05, ge=0, le=1)
    quic_host: str | None = None
    advertise_address: str | None = None
    bootstrap_peers: tuple[str, ...] = ()
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=600)
    heartbeat_misses: int = Field(default=3, ge=1, le=100)
    reconnect_max_backoff_s: float = Field(default=60.0, gt=0, le=3600)
    peer_exchange_interval_s: float = Field(default=30.0, gt=0, le=86400)
    max_peers: int = Field(default=32, ge=1, le=1024)
    max_frame_bytes: int = Field(default=1 << 20, ge=4096, le=64 << 20)
    # Bounds on what peers can make this node hold (see ARCHITECTURE.md, Invariants); over a bound the
    # newcomer is refused (a link closed at connect, a stream answered with an error frame).
    max_inbound_links: int = Field(default=64, ge=1, le=65536)
    max_handshaking: int = Field(default=64, ge=1, le=65536)
    max_streams_per_link: int = Field(default=64, ge=2, le=100)
    max_queued_frames_per_stream: int = Field(default=4096, ge=4, le=65536)
    max_buffered_bytes_per_stream: int = Field(default=4 << 20, ge=8192, le=256 << 20)
    max_requests_per_peer: int = Field(default=64, ge=1, le=4096)
    max_gossip_per_minute: int = Field(default=1200, ge=1, le=1_000_000)
    # Peer exchange: addresses learned from peers are hints (signed by their peer; see
    # mycellm/network/peer_hints.py). Only literal public IPs are kept and dialed, plus private
    # ranges (RFC 1918, 100.64/10, fc00::/7) when allowed and the CIDRs listed; bootstrap peers are
    # always dialed as configured. The table of hints is bounded overall, per peer that relayed
    # them, per /16 (IPv6: /32) and per account; few unproven addresses are dialed a minute.
    allow_private_peer_addresses: bool = False
    allowed_peer_networks: tuple[Annotated[str, AfterValidator(_check_network)], ...] = Field(
        default=(), max_length=64
    )
    max_peer_hints: int = Field(default=256, ge=1, le=65536)
    max_hints_per_source: int = Field(default=32, ge=1, le=65536)
    max_hints_per_address_group: int = Field(default=16, ge=1, le=65536)
    max_hints_per_account: int = Field(default=8, ge=1, le=65536)
    max_hint_dials_per_minute: int = Field(default=10, ge=0, le=100_000)
    # The network of requests that name none: a network name or id prefix (default: see README).
    network: str | None = Field(default=None, max_length=64)
    # An invite (token text or mycellm://join link) redeemed at start unless already a member.
    join: str | None = Field(default=None, max_length=12000)
    credits: PriceSettings = PriceSettings()
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _check(self) -> NodeSettings:
        # No model at all is allowed: such a node relays to its peers (or is a bootstrap node).
        for address in (*self.bootstrap_peers, *([self.advertise_address] if self.advertise_address else [])):
            split_address(address)
        return self

    @property
    def resolved_quic_host(self) -> str:
        return self.quic_host or self.host

    @property
    def resolved_advertise_address(self) -> str | None:
        """host:port peers should dial; None when bound to a wildcard and nothing was set."""
        if self.advertise_address:
            return self.advertise_address
        host = self.resolved_quic_host
        if host in ("0.0.0.0", "::", "") or self.quic_port == 0:
            return None  # the node fills in the port it bound
        return join_address(host, self.quic_port)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.resolved_data_dir / 'mycellm.db'}"

    @property
    def model_entries(self) -> tuple[ModelSettings, ...]:
        """The configured models, with the ``model`` shortcut replacing the first local entry."""
        if self.model is None:
            return self.models
        shortcut = ModelSettings(path=self.model)
        rest = tuple(m for m in self.models if m.backend != "llama_cpp")
        return (shortcut, *rest)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into its parts; ValueError naming the address if it is not one."""
    host, separator, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port_text)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The YAML file in use is set by load_settings for the duration of one construction.
_yaml_file: Path | None = None


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; never used

    def __call__(self) -> dict[str, Any]:
        if _yaml_file is None:
            return {}
        return read_yaml_config(_yaml_file)


def read_yaml_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}", param="config") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        position = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise ConfigError(
            f"config file {path} is not valid YAML{position}: {problem}", param="config"
        ) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level", param="config")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> NodeSettings:
    """Build NodeSettings from all sources; raise ConfigError naming the first bad field."""
    global _yaml_file
    if config_file is None and os.environ.get("MYCELLM_CONFIG"):
        config_file = Path(os.environ["MYCELLM_CONFIG"])
    flags = {key: value for key, value in overrides.items() if value is not None}
    _yaml_file = config_file
    try:
        return NodeSettings(**flags)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConfigError(f"{field}: {first['msg']}", param=field) from error
    finally:
        _yaml_file = None
