"""``imsight download-model``: fetch a model snapshot once, on a machine that has internet."""

from __future__ import annotations

from pathlib import Path

from core.errors import ImsightError
from core.model_files import hub_offline

__all__ = ["download_model"]


def download_model(config_path: Path | None, model: str | None, local_dir: Path | None, revision: str | None) -> int:
    """Download ``model`` (default: the configured one) into the cache or ``local_dir``, with progress bars."""
    from bot.config import load, parse

    config = load(config_path) if config_path is not None else parse({})
    repo = model or config.engine.model
    if hub_offline():
        raise ImsightError(
            "HF_HUB_OFFLINE is set, so nothing is downloaded here. Run `imsight download-model "
            f"{repo} --local-dir DIR` on a machine with internet and copy DIR over."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    print(f"downloading {repo} to {local_dir or config.engine.cache_dir or 'the Hugging Face cache'} ...",
          flush=True)
    try:
        # huggingface_hub draws one progress bar per file and one for the whole snapshot.
        path = snapshot_download(repo, revision=revision, cache_dir=config.engine.cache_dir, local_dir=local_dir)
    except RepositoryNotFoundError as exc:
        raise ImsightError(f"no model {repo!r} on the hub (or it is private: log in with `hf auth login`)") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ImsightError(f"download of {repo!r} failed: {str(exc).splitlines()[0]}") from exc
    print(f"done: {path}")
    if local_dir is not None:
        print(f'copy it to the bot host and set [engine] model_path = "{local_dir}"')
    else:
        print(f'the daemon finds it in the cache with [engine] model = "{repo}" (no model_path)')
    return 0
