"""Configuration: one typed, validated object from a TOML file and the environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model

from adapters import registry
from adapters.base import Deployment, PlatformSettings
from core.errors import ConfigError

__all__ = [
    "Config", "allowed_hosts", "config_model", "configured_secrets", "deployment", "env_secrets", "image_budget",
    "is_loopback", "load", "parse",
]


class _Section(BaseModel):
    # A typo must not fall back silently to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_mb: float = Field(32, gt=0)  # the generic API's bodies; platform events are held to 1 MB
    max_connections: int = Field(512, ge=1)  # open at once; more are refused (each costs a file descriptor)
    header_timeout_seconds: float = Field(10, gt=0)  # a connection must send its request headers this fast
    body_timeout_seconds: float = Field(60, gt=0)  # and a request its whole body
    shutdown_grace_seconds: float = Field(30, ge=0)
    # Reverse proxies (their addresses as the daemon sees them) whose X-Forwarded-* headers are believed.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Host names requests may be addressed to (the Host header); others get 421, which stops DNS
    # rebinding. Empty: host, localhost, 127.0.0.1 and ::1. Add your public name behind a proxy; "*": any.
    allowed_hosts: list[str] = Field(default_factory=list)


class StorageConfig(_Section):
    data_dir: Path = Path("./data")
    retention_days: float = Field(0, ge=0)  # delete messages and images older than this; 0 keeps them
    # Image files over this total: the oldest messages go first. "auto": half of the disk space free
    # (plus what images take already) when the daemon starts; 0: no budget.
    max_bytes: int | Literal["auto"] = Field("auto", union_mode="left_to_right")
    lock_timeout_seconds: float = Field(5, gt=0)  # wait this long for a lock held by another process


class LimitsConfig(_Section):
    max_queued: int = Field(500, ge=0)  # questions waiting, all chats; more are told "busy"; 0 = no bound
    max_queued_per_chat: int = Field(20, ge=0)  # waiting or running in one chat; 0 = no bound
    questions_per_sender_per_minute: int = Field(10, ge=0)  # one person, all chats; 0 = no limit
    job_timeout_seconds: float = Field(300, gt=0)  # one answer; longer is stopped and the asker told
    engine_retry_minutes: float = Field(30, ge=0)  # model server unreachable: keep retrying a question this long
    delivery_attempts: int = Field(8, ge=1)  # tries to send a reply (backoff 1 s, 2 s, 4 s ... 5 min)


class ImagesConfig(_Section):
    max_mb: float = Field(20, gt=0)  # bytes of one image as received
    max_pixels: int = Field(40_000_000, gt=0)  # width x height; larger is a decompression bomb
    max_side: int = Field(1536, ge=64)  # longest side the model sees; larger images are scaled down


class EngineConfig(_Section):
    kind: Literal["transformers", "openai"] = "transformers"
    # transformers: a hub id, looked up in the local Hugging Face cache; openai: the served model's name.
    model: str = "zai-org/GLM-4.6V-Flash"
    model_path: Path | None = None  # a local directory; wins over `model`
    cache_dir: Path | None = None  # the Hugging Face cache; default $HF_HUB_CACHE or ~/.cache/huggingface/hub
    allow_download: bool = False  # fetch `model` from the hub when it is not cached
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["auto", "nf4", "int4", "fp8", "int8", "none"] = "auto"
    max_new_tokens: int = Field(512, ge=1)
    workers: int = Field(8, ge=1, le=64)  # jobs answered at once (one per chat at a time)
    max_batch: int = Field(8, ge=1, le=64)  # questions generated together in one batch
    batch_window_ms: float = Field(0, ge=0, le=1000)  # when idle, how long a question waits for others
    prefix_cache_mb: float = Field(2048, ge=0)  # KV caches kept for follow-ups; 0 turns the cache off
    warmup: bool = True  # answer a dummy question at start, so the first real one is not slow
    # Each question being answered holds a KV slot of this many tokens (prompt + answer); max_batch slots.
    # On a GPU the slots take at most a quarter of the memory free after the weights (logged at start).
    context_tokens: int = Field(4096, ge=256, le=131072)
    cuda_graphs: bool = True  # capture the decode step as CUDA graphs at start (GPU); false: eager
    # Compile the vision encoder's blocks (torch.compile) where vision_kernels does not take them, and
    # the decoder layers where decoder_kernels does not, for decode steps (then captured again) and first
    # questions' prefill: fewer, fused kernels. Done while idle after start; inductor's code is cached
    # under data_dir/compile-cache (dynamo still traces anew in every process).
    compile_decode: bool = True
    # GLM-4V in int4 on a GPU: the decoder layers through imsight's Triton kernels (checked against
    # transformers' layer at start), so nothing of the decoder is compiled; false: transformers' layers,
    # compiled while idle (compile_decode).
    decoder_kernels: bool = True
    # GLM-4V on a GPU: the vision encoder's blocks through imsight's Triton kernels too (checked against
    # transformers' block at start), so nothing of it is compiled; false: its blocks compiled (compile_decode).
    vision_kernels: bool = True
    # Decode steps' attention through imsight's split-KV Triton kernel (GPU; it is checked against SDPA
    # at start, and SDPA stays where it disagrees or cannot run); false: SDPA always.
    split_kv_attention: bool = True
    # int4: keep every weight unpacked to full width as well (GLM-4.6V-Flash: 15.2 GiB more), so prefills
    # (first questions, follow-ups' new tokens) read it instead of unpacking it each time: the same weights.
    unpacked_weights: bool = False
    # int4: keep the quantized weights under data_dir/int4-cache (GLM-4.6V-Flash: 4.3 GB, one file a model), so a
    # restart reads them instead of quantizing again (4.3-7.7 s of every start on the H200); rewritten when the
    # model's files or these settings change.
    int4_cache: bool = True
    # kind = "openai": an OpenAI-compatible server (vLLM, SGLang, LMDeploy, Ollama).
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: SecretStr | None = None
    timeout_seconds: float = Field(120, gt=0)  # one answer, start to end
    connect_attempts: int = Field(3, ge=1)  # tries to reach the server before a question fails


class ContextConfig(_Section):
    window_minutes: float = Field(10, ge=0)
    history_turns: int = Field(6, ge=0)  # earlier questions and answers sent along, as text
    no_image: Literal["answer", "ask"] = "answer"
    # An image sent alone in a direct chat: "acknowledge" (kept, one line invites the question) or
    # "answer" (the model describes it at once, a question nobody asked)
    image_alone: Literal["acknowledge", "answer"] = "acknowledge"


class AdminConfig(_Section):
    enabled: bool = False  # the history page at /admin, on the daemon's server
    token: SecretStr | None = None  # required when enabled, 16 characters or more; or IMSIGHT_ADMIN_TOKEN
    session_hours: float = Field(8, gt=0)  # a login lasts this long


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one object per line, for a log pipeline
    message_text: bool = False  # true: each stored message's line at INFO shows its text (200 characters)


class Adapters(_Section):
    """``[adapters]``: one section per platform in ``adapters.registry`` (the model that parses a file
    has a field for each; see ``config_model``)."""

    def platform(self, name: str) -> PlatformSettings:
        """The ``[adapters.<name>]`` section (defaults when the file has none)."""
        section = getattr(self, name, None)
        if not isinstance(section, PlatformSettings):
            raise KeyError(f"no platform {name!r} in adapters.registry")
        return section

    def enabled(self) -> Iterator[tuple[str, PlatformSettings]]:
        for name in registry.platforms():
            section = self.platform(name)
            if section.enabled:
                yield name, section


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    adapters: Adapters = Field(default_factory=Adapters)


def config_model() -> type[Config]:
    """``Config`` with a section under ``[adapters]`` for each platform registered now."""
    platforms = tuple(registry.platforms().items())
    if platforms not in _models:
        sections: dict[str, Any] = {name: (settings, Field(default_factory=settings)) for name, settings in platforms}
        adapters = create_model("AdaptersConfig", __base__=Adapters, **sections)
        _models[platforms] = create_model("Config", __base__=Config,
                                          adapters=(adapters, Field(default_factory=adapters)))
    return _models[platforms]


_models: dict[tuple[tuple[str, type[PlatformSettings]], ...], type[Config]] = {}


def env_secrets() -> dict[str, tuple[str, ...]]:
    """Secrets that may live in the environment instead of the file (the environment wins): each
    platform's ``SecretStr`` fields as ``IMSIGHT_<PLATFORM>_<FIELD>``, the engine's key, the admin token."""
    found: dict[str, tuple[str, ...]] = {"IMSIGHT_ENGINE_API_KEY": ("engine", "api_key"),
                                         "IMSIGHT_ADMIN_TOKEN": ("admin", "token")}
    for name, settings in registry.platforms().items():
        for field in registry.secret_fields(settings):
            found[f"IMSIGHT_{name.upper()}_{field.upper()}"] = ("adapters", name, field)
    return found


def configured_secrets(config: Config) -> list[str]:
    """The values of every secret the config holds (for keeping them out of logs)."""
    values = []
    for keys in env_secrets().values():
        node: Any = config
        for key in keys:
            node = getattr(node, key, None)
        if isinstance(node, SecretStr):
            values.append(node.get_secret_value())
    for name in registry.platforms():  # and those a section keeps otherwise (a table of keys, say)
        values += [value for value in config.adapters.platform(name).secret_values() if value not in values]
    return values


def deployment(config: Config) -> Deployment:
    """What every platform's section is checked and built against, from the rest of the config."""
    return Deployment(
        server_host=config.server.host, loopback_only=is_loopback(config.server.host),
        max_body_bytes=int(config.server.max_body_mb * 2**20), max_image_bytes=int(config.images.max_mb * 2**20),
        admin_token=config.admin.token.get_secret_value() if config.admin.token else None,
    )


def load(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, overlay secrets from the environment, and validate; raise ``ConfigError``.

    Relative paths in the file (``data_dir``, ``model_path``, ``cache_dir``) are relative to the
    file's folder, not to wherever the command was started.
    """
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        hint = " (cp config.example.toml config.toml, then edit it; or pass --config FILE)" if (
            path.name == "config.toml") else ""
        raise ConfigError(f"{path}: no such file{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, environ, source=str(path), base=path.resolve().parent)


def parse(raw: dict[str, Any], environ: Mapping[str, str] | None = None, *, source: str = "config",
          base: Path | None = None) -> Config:
    """Validate an already-parsed mapping (the TOML document); every problem is reported at once."""
    env = os.environ if environ is None else environ
    for name, keys in env_secrets().items():
        if env.get(name):
            _put(raw, keys, env[name])
    model = config_model()
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        problems = list(_problems(exc))
        # What else is wrong (a token an enabled platform lacks, say) is told now too, not after the
        # first fix: checked on the file with the keys named above left out.
        rest = _without(raw, [error["loc"] for error in exc.errors()])
        with contextlib.suppress(ValidationError):  # a key that only makes sense with the refused ones
            problems += [p for p in _incomplete(model.model_validate(rest)) if p not in problems]
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems)) from None
    if problems := list(_incomplete(config)):
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
    return _relative_to(config, base) if base is not None else config


def _without(raw: dict[str, Any], locations: list[tuple[int | str, ...]]) -> dict[str, Any]:
    """A deep copy of ``raw`` without the keys at ``locations`` (the ones validation refused)."""
    import copy

    rest = copy.deepcopy(raw)
    for location in locations:
        node: Any = rest
        for key in location[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and location:
            node.pop(location[-1], None)
    return rest


def _incomplete(config: Config) -> Iterator[str]:
    """What each enabled part needs besides its defaults: one check, for ``run`` and ``doctor`` alike."""
    where = deployment(config)
    for name in registry.platforms():
        section = config.adapters.platform(name)
        # The generic API's secret is checked even while it is off: a file that holds one means it.
        if section.enabled or name == "webhook":
            for key, problem in section.problems(where):
                if section.enabled or key == "secret":
                    yield f"adapters.{name}{'.' + key if key else ''}: {problem}"
    if config.admin.enabled and config.admin.token is None:
        yield "admin.token: required when [admin] enabled (or IMSIGHT_ADMIN_TOKEN)"
    elif config.admin.enabled and config.admin.token and len(config.admin.token.get_secret_value()) < 16:
        yield "admin.token: at least 16 characters (try: python3 -c 'import secrets; print(secrets.token_urlsafe())')"


def image_budget(config: Config) -> int:
    """``[storage] max_bytes`` in bytes, "auto" worked out from the disk the data dir is on now."""
    budget = config.storage.max_bytes
    if budget != "auto":
        return budget
    probe = next((p for p in (config.storage.data_dir, *config.storage.data_dir.parents) if p.exists()), Path("/"))
    images = probe / "images" if probe == config.storage.data_dir else None
    used = sum(f.stat().st_size for f in images.rglob("*") if f.is_file()) if images and images.exists() else 0
    return (shutil.disk_usage(probe).free + used) // 2


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def allowed_hosts(config: Config) -> list[str]:
    """The Host header values the server answers (``[server] allowed_hosts``, or its defaults)."""
    return config.server.allowed_hosts or [config.server.host, "localhost", "127.0.0.1", "::1"]


def _relative_to(config: Config, base: Path) -> Config:
    def resolved(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base / path

    storage = config.storage.model_copy(update={"data_dir": resolved(config.storage.data_dir)})
    engine = config.engine.model_copy(update={"model_path": resolved(config.engine.model_path),
                                              "cache_dir": resolved(config.engine.cache_dir)})
    return config.model_copy(update={"storage": storage, "engine": engine})


def _put(raw: dict[str, Any], keys: tuple[str, ...], value: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return  # the file has a wrong type here; validation will name it
        node = child
    node[keys[-1]] = value




def _problems(exc: ValidationError) -> Iterator[str]:
    secrets = {keys[-1] for keys in env_secrets().values()}  # never echo what may be a credential
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        kind = error["type"]
        if kind == "extra_forbidden":
            yield f"{key}: unknown key"
            continue
        if kind == "missing":
            yield f"{key}: required value missing"
            continue
        value = error.get("input")
        hidden = error["loc"][-1] in secrets or isinstance(value, dict) or kind == "model_type"
        shown = "" if hidden else f" (got {value!r})"
        yield f"{key}: {error['msg']}{shown}"
