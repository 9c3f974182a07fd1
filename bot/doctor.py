"""``imsight doctor``: what works and what does not on this host, each with its fix.

Offline by default: nothing here reaches the network unless ``online`` is set, and then only the
configured model server and the enabled platforms' token endpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from bot.config import Config, configured_secrets, deployment, image_budget, load
from core.errors import ImsightError

__all__ = ["Check", "diagnose", "report"]

GiB = 2**30
Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def diagnose(config_path: Path, *, online: bool = False) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    try:
        config = load(config_path)
    except ImsightError as exc:
        return [_python(), Check("config", "fail", str(exc), f"edit {config_path} (config.example.toml "
                                 "shows every key)")]
    checks = [_python(), Check("config", "ok", f"{config_path} is valid")]
    checks += list(_gpu_and_model(config))
    checks += list(_data_dir(config))
    checks += list(_platforms(config))
    if online:
        checks += asyncio.run(_online(config))
    return checks


def report(checks: list[Check], *, as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(c) for c in checks], ensure_ascii=False, indent=2)
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():<4}  {check.name:<22} {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"{'':<6}{'':<22} fix: {check.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"\n{len(checks)} checks: {failed} failed, {warned} warning(s)")
    return "\n".join(lines)


def _python() -> Check:
    # An older Python cannot import imsight at all (pyproject says >=3.11): this line is for the record.
    return Check("python", "ok", f"Python {'.'.join(map(str, sys.version_info[:3]))} at {sys.executable}")


def _gpu_and_model(config: Config) -> Iterator[Check]:
    engine = config.engine
    if engine.kind == "openai":
        yield Check("engine", "ok", f"model server at {engine.base_url}, model {engine.model!r} "
                    "(reached only with --online)")
        return
    try:
        import torch
    except ImportError:
        yield Check("torch", "fail", "torch is not installed", "make run (or pip install torch)")
        return
    cuda = torch.cuda.is_available()
    if cuda:
        free, total = torch.cuda.mem_get_info()
        yield Check("gpu", "ok", f"{torch.cuda.get_device_name(0)}, driver {_driver()}, CUDA {torch.version.cuda}, "
                    f"torch {torch.__version__}, {free / GiB:.1f} of {total / GiB:.1f} GiB free")
    elif engine.device == "cuda":
        yield Check("gpu", "fail", f"[engine] device = \"cuda\" but torch {torch.__version__} sees no GPU",
                    "check nvidia-smi and the driver; install a CUDA build of torch")
    else:
        yield Check("gpu", "warn", f"no CUDA GPU (torch {torch.__version__}): the model runs on the CPU, slowly",
                    "on a GPU host: check nvidia-smi and install a CUDA build of torch")
    on_gpu = cuda and engine.device != "cpu"
    capability = torch.cuda.get_device_capability(0) if on_gpu else None
    checks = list(quantization_checks(engine.quantization, capability))
    yield from checks
    if capability is not None and any(c.name == "int4" and c.status == "ok" for c in checks):
        yield int4_decode_kernel_check()
    # After a quantization that cannot run here, the model is checked as "auto" would load it.
    failed = any(c.name == "quantization" and c.status == "fail" for c in checks)
    yield from _model(config, "auto" if failed else engine.quantization)


def int4_decode_kernel_check() -> Check:
    """Whether imsight's int4 decode kernel (``core.int4_mma``) compiles here: without it, decode steps
    take torch's int4 kernel, and a step of 8 questions costs 1.8x one of a single question, not 1.1x."""
    try:
        from core import int4_mma

        int4_mma.Kernels([int4_mma.config_for(16, 1)])
    except Exception as exc:  # no NVRTC, no GPU, a GPU it cannot build for
        return Check("int4 decode kernel", "warn",
                     f"imsight's int4 decode kernel does not compile here ({exc}); decode steps use torch's "
                     "int4 kernel (several questions at once decode ~1.6x slower)",
                     "install torch's CUDA build with its nvidia-cuda-nvrtc package")
    return Check("int4 decode kernel", "ok", "imsight's int4 decode kernel compiles here (NVRTC)")


def quantization_checks(setting: str, capability: tuple[int, int] | None) -> Iterator[Check]:
    """What the quantization ``setting`` needs, on a GPU of ``capability`` (``None``: the CPU)."""
    from core.errors import EngineError
    from core.quantization import pick_mode

    try:
        mode = pick_mode(setting, "cpu" if capability is None else "cuda", capability)
    except EngineError as exc:  # fp8 on a GPU that cannot multiply it
        detail, _, fix = str(exc).partition(" Fix: ")
        yield Check("quantization", "fail", detail, fix)
        return
    if mode == "fp8":
        yield Check("fp8", "ok", "cuBLAS's fp8 product runs here" + (
            f" (compute capability {capability[0]}.{capability[1]})" if capability else ""))
    elif mode == "int4":
        if capability is not None and capability >= (8, 0):
            yield Check("int4", "ok", f"torch's int4 kernel runs on compute capability {capability[0]}.{capability[1]}")
        else:
            yield Check("int4", "warn", "torch's int4 kernel needs a CUDA GPU of compute capability 8.0 or later: "
                        "int4 weights are unpacked for every forward here (slow)", "[engine] quantization = \"nf4\"")
    elif mode != "none":
        try:
            import bitsandbytes

            yield Check("bitsandbytes", "ok", f"bitsandbytes {bitsandbytes.__version__} for {mode}")
        except Exception as exc:  # its import probes CUDA libraries and may fail in many ways
            yield Check("bitsandbytes", "fail", f"cannot import bitsandbytes for {mode}: {exc}",
                        "pip install bitsandbytes (a build for this CUDA), or [engine] quantization = \"none\"")


def _driver() -> str:
    """The NVIDIA driver's version, as nvidia-smi reports it ("unknown" without nvidia-smi)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown"
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.splitlines()[0].strip() if done.stdout.strip() else "unknown"


def _model(config: Config, quantization: str) -> Iterator[Check]:
    from core.model_files import resolve
    from core.model_loading import plan

    engine = config.engine
    try:
        source = resolve(engine.model, engine.model_path, allow_download=False, cache_dir=engine.cache_dir)
        planned = plan(source, device=engine.device, dtype=engine.dtype, quantization=quantization,
                       cache_dir=engine.cache_dir, unpacked_weights=engine.unpacked_weights)
    except ImsightError as exc:
        yield Check("model files", "fail", str(exc).split(". ")[0], _after_first_sentence(str(exc)))
        return
    need = planned.need
    unpacked = f", {need.unpacked / GiB:.1f} GiB more kept unpacked for prefill" if need.unpacked else ""
    yield Check("model files", "ok", f"{source.name_or_path}: about {need.weights / GiB:.1f} GiB of weights as "
                f"{planned.mode} on {planned.device}{unpacked}")
    if engine.kind == "transformers" and planned.kv_bytes_per_token:
        slots = planned.kv_bytes_per_token * engine.max_batch * engine.context_tokens
        yield Check("kv slots", "ok", f"{engine.max_batch} questions x {engine.context_tokens} tokens x "
                    f"{planned.kv_bytes_per_token // 1024} KB = {slots / GiB:.2f} GiB at most (continuous batching; "
                    "on a GPU capped at a quarter of what the weights leave free)")
    if planned.free is None:
        yield Check("memory", "warn", f"free memory on {planned.device} unknown", "")
    elif need.total > planned.free:
        fix = {"fp8": '[engine] quantization = "int4" (half the bytes a weight)', "nf4": "free the GPU or use a "
               "smaller model"}.get(planned.mode, '[engine] quantization = "nf4"')
        yield Check("memory", "fail", f"needs about {need.total / GiB:.1f} GiB, {planned.free / GiB:.1f} GiB free "
                    f"on {planned.device}", fix)
    else:
        yield Check("memory", "ok", f"needs about {need.total / GiB:.1f} GiB, {planned.free / GiB:.1f} GiB free "
                    f"on {planned.device}")


def _after_first_sentence(text: str) -> str:
    _, _, rest = text.partition(". ")
    return rest.removeprefix("Fix: ").removeprefix("fix: ") or "see the README: A real model"


def _data_dir(config: Config) -> Iterator[Check]:
    data_dir = config.storage.data_dir.expanduser()
    probe = data_dir if data_dir.exists() else next((p for p in data_dir.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        yield Check("data dir", "fail", f"{data_dir}: cannot write in {probe}",
                    f"create it for the daemon's user: install -d -m 0700 -o $USER {data_dir}")
        return
    if data_dir.exists() and data_dir.stat().st_mode & 0o077:
        yield Check("data dir", "warn", f"{data_dir} is open to other users ({oct(data_dir.stat().st_mode & 0o777)})",
                    f"chmod 0700 {data_dir} (the daemon also does at start)")
    else:
        yield Check("data dir", "ok", f"{data_dir} " + ("exists, private" if data_dir.exists() else "will be created"))
    free = shutil.disk_usage(probe).free
    budget = image_budget(config)
    yield Check("disk", "ok" if free >= GiB else "warn", f"{free / GiB:.1f} GiB free at {probe}; images may take "
                + (f"{budget / GiB:.1f} GiB ([storage] max_bytes)" if budget else "all of it (max_bytes = 0)"),
                "free disk space, or set [storage] retention_days / max_bytes")


def _platforms(config: Config) -> Iterator[Check]:
    # What an enabled platform must have is checked with the config (bot.config), as for `imsight run`.
    where = deployment(config)
    for name, settings in config.adapters.enabled():
        for finding in settings.findings(where):
            yield Check(settings.doctor_label or name, finding.status, finding.detail, finding.fix)


async def _online(config: Config) -> list[Check]:
    """Each enabled platform's credentials and the model server, tried for real."""
    import aiohttp

    checks: list[Check] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async def attempt(name: str, call: Callable[[], Awaitable[str | None]], fix: str) -> None:
            try:
                if (worked := await call()) is not None:  # None: nothing to try
                    checks.append(Check(f"{name} (online)", "ok", worked))
            except Exception as exc:  # whatever the network or the platform does: reported, not raised
                checks.append(Check(f"{name} (online)", "fail", _scrubbed(f"{type(exc).__name__}: {exc}", config),
                                    fix))

        engine = config.engine
        if engine.kind == "openai":
            async def models() -> str:
                headers = {"Authorization": f"Bearer {engine.api_key.get_secret_value()}"} if engine.api_key else {}
                async with http.get(f"{engine.base_url.rstrip('/')}/models", headers=headers) as resp:
                    resp.raise_for_status()
                    served = [m.get("id") for m in (await resp.json()).get("data", [])]
                if engine.model not in served:
                    raise ImsightError(f"the server does not serve {engine.model!r}; it serves {served}")
                return f"serves {engine.model!r}"

            await attempt("model server", models, "start the server, or fix [engine] base_url / model / api_key")
        for name, settings in config.adapters.enabled():
            await attempt(settings.doctor_label or name, settings.online, settings.online_fix)
    return checks


def _scrubbed(text: str, config: Config) -> str:
    """An error may quote a URL with a token in it (Telegram's): never print a secret."""
    for secret in configured_secrets(config):
        text = text.replace(secret, "<redacted>")
    return text
