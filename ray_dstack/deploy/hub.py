"""Chat settings of a `format: tgi` model: from the service YAML, else from the model's Hugging Face Hub repo.

`resolve_chat_settings` returns the chat template and the bos/eos tokens the gateway needs to turn an
OpenAI chat request into a TGI prompt. Values set in the YAML (`model.chat_template`, `model.eos_token`)
win; whatever is missing is read from the model's `tokenizer_config.json` at revision `main` (then
`chat_template.jinja` / `chat_template.json` when the config has no template, as newer repositories
keep it there) with `huggingface_hub.hf_hub_download`, through its cache.

The Hub endpoint and token are the *service's*: `HF_ENDPOINT` from the service env (else the process
env, else huggingface.co) and `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` from the service env only — the
operator's own login is never used, so a deploy that works here also works on the cluster.

Every failure is a `HubError` naming the model and the fix; the template is compiled here so that a
broken template fails the deploy, not the first request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray_dstack.errors import RayDstackError
from ray_dstack.openai.templates import ChatTemplate, TemplateError

__all__ = ["ChatSettings", "HubError", "resolve_chat_settings", "DEFAULT_ENDPOINT"]

DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = "main"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class HubError(RayDstackError):
    """The model's chat settings could not be resolved (message names the model and the fix)."""


@dataclass(frozen=True)
class ChatSettings:
    chat_template: str
    eos_token: str | None
    bos_token: str | None
    # Where the values came from: "yaml" (all from the service file), "hub" (all from the Hub) or
    # "yaml+hub" (the template or the eos token from the YAML, the rest from the Hub).
    source: str


def resolve_chat_settings(
    model_name: str,
    *,
    chat_template: str | None,
    eos_token: str | None,
    env: Mapping[str, str],
    bos_token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> ChatSettings:
    """Resolve the chat template and bos/eos tokens of `model_name` (a Hub repo id).

    `chat_template`, `eos_token` (and `bos_token`) are the YAML's values: when both the template and the
    eos token are set the Hub is not contacted. `env` is the service's environment.
    """
    if chat_template is not None and eos_token is not None:
        _compile(model_name, chat_template, "`model.chat_template`")
        return ChatSettings(chat_template=chat_template, eos_token=eos_token, bos_token=bos_token, source="yaml")

    endpoint = (env.get("HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = next((env[k] for k in TOKEN_ENV_VARS if env.get(k)), None)
    missing = " and ".join(
        name for name, value in (("`model.chat_template`", chat_template), ("`model.eos_token`", eos_token))
        if value is None
    )
    fetch = _Fetcher(model_name, endpoint=endpoint, token=token, cache_dir=cache_dir, timeout=timeout,
                     missing=missing)

    config = fetch.json("tokenizer_config.json") or {}
    hub_template, template_file = _template_from_config(model_name, config.get("chat_template"))
    if hub_template is None and chat_template is None:
        jinja = fetch.text("chat_template.jinja")
        if jinja is not None:
            hub_template, template_file = jinja, "chat_template.jinja"
        else:
            processor = fetch.json("chat_template.json") or {}
            hub_template, _ = _template_from_config(model_name, processor.get("chat_template"))
            template_file = "chat_template.json"

    hub_eos = _token_content(config.get("eos_token"))
    hub_bos = _token_content(config.get("bos_token"))

    if chat_template is not None:
        final_template, where = chat_template, "`model.chat_template`"
    elif hub_template is not None:
        final_template, where = hub_template, f"{template_file} of {model_name}"
    else:
        raise HubError(
            f"Model {model_name} has no chat template (none in its tokenizer_config.json on {endpoint}); "
            "set `model.chat_template` in the service configuration"
        )
    _compile(model_name, final_template, where)
    from_yaml = chat_template is not None or eos_token is not None
    return ChatSettings(
        chat_template=final_template,
        eos_token=eos_token if eos_token is not None else hub_eos,
        bos_token=bos_token if bos_token is not None else hub_bos,
        source="yaml+hub" if from_yaml else "hub",
    )


def _compile(model_name: str, source: str, where: str) -> None:
    try:
        ChatTemplate(source)
    except TemplateError as err:
        raise HubError(f"The chat template of model {model_name} ({where}) does not compile: {err}") from None


def _token_content(value: Any) -> str | None:
    """`"</s>"` or an AddedToken dict `{"content": "</s>", ...}` → `"</s>"`; anything else → None."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_from_config(model_name: str, value: Any) -> tuple[str | None, str]:
    """`chat_template` as a string or as a list of `{name, template}` (the `default` one is used)."""
    if value is None:
        return None, "tokenizer_config.json"
    if isinstance(value, str):
        return value, "tokenizer_config.json"
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, Mapping) and isinstance(item.get("template"), str)
        }
        if "default" in named:
            return named["default"], "tokenizer_config.json (template `default`)"
        if named:
            names = ", ".join(sorted(str(n) for n in named))
            raise HubError(
                f"Model {model_name} has named chat templates ({names}) but no `default` one; "
                "set `model.chat_template` in the service configuration"
            )
        return None, "tokenizer_config.json"
    raise HubError(
        f"The `chat_template` in tokenizer_config.json of model {model_name} is a {type(value).__name__}, "
        "not a string; set `model.chat_template` in the service configuration"
    )


class _Fetcher:
    def __init__(self, model_name: str, *, endpoint: str, token: str | None, cache_dir: Any, timeout: float,
                 missing: str) -> None:
        self.model_name = model_name
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.missing = missing

    def text(self, filename: str) -> str | None:
        """The file's text, or None when the repository has no such file."""
        path = self._download(filename)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise HubError(f"Cannot read {filename} of model {self.model_name}: {err}") from None

    def json(self, filename: str) -> dict[str, Any] | None:
        text = self.text(filename)
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise HubError(f"{filename} of model {self.model_name} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise HubError(f"{filename} of model {self.model_name} is not a JSON object")
        return data

    def _download(self, filename: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import validate_repo_id

        name = self.model_name
        fix = f"or set {self.missing} in the service configuration"
        kwargs: dict[str, Any] = dict(
            repo_id=name,
            filename=filename,
            revision=REVISION,
            endpoint=self.endpoint,
            token=self.token if self.token else False,
            cache_dir=self.cache_dir,
            etag_timeout=self.timeout,
        )
        try:
            validate_repo_id(name)
            # huggingface_hub retries network errors and 5xx answers for ~25 s per file; one quick probe
            # first turns an unreachable Hub into an immediate answer (from the cache when it has the file).
            unreachable = self._probe(filename)
            if unreachable is not None:
                try:
                    return hf_hub_download(**kwargs, local_files_only=True)
                except (LocalEntryNotFoundError, OSError, ValueError):
                    raise HubError(
                        f"Cannot read {filename} of model {name}: the Hugging Face Hub at {self.endpoint} is "
                        f"unreachable or failing ({unreachable}). Check the network (or HF_ENDPOINT in the service env), {fix}"
                    ) from None
            return hf_hub_download(**kwargs)
        except GatedRepoError:
            if self.token:
                raise HubError(
                    f"Model {name} is gated and the token in the service env (HF_TOKEN) has no access to it: "
                    f"request access on its Hub page with that account, {fix}"
                ) from None
            raise HubError(
                f"Model {name} is gated: set HF_TOKEN in the service env to a token with access to it, {fix}"
            ) from None
        except RepositoryNotFoundError:
            hint = "" if self.token else " (or set HF_TOKEN in the service env if it is private)"
            raise HubError(
                f"Model {name} was not found on the Hugging Face Hub ({self.endpoint}): check `model.name`{hint}"
            ) from None
        except RevisionNotFoundError:
            raise HubError(f"Model {name} has no revision `{REVISION}` on {self.endpoint}") from None
        except LocalEntryNotFoundError as err:  # (a subclass of EntryNotFoundError) the Hub failed, no cache
            cause = err.__cause__ or err.__context__
            detail = f": {_short(cause)}" if cause is not None else ""
            raise HubError(
                f"Cannot read {filename} of model {name} from the Hugging Face Hub at {self.endpoint}{detail}. "
                f"Check the network (or HF_ENDPOINT in the service env), {fix}"
            ) from None
        except EntryNotFoundError:
            return None
        except HFValidationError as err:
            raise HubError(f"Model name {name!r} is not a valid Hugging Face repo id: {_short(err)}") from None
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            if status in (401, 403):
                what = (
                    "rejected the token in HF_TOKEN" if self.token
                    else "requires a token: set HF_TOKEN in the service env"
                )
                raise HubError(f"The Hub ({self.endpoint}) {what} for model {name} (HTTP {status}), {fix}") from None
            raise HubError(
                f"The Hub ({self.endpoint}) answered HTTP {status} for {filename} of model {name}, {fix}"
            ) from None
        except (OSError, ValueError) as err:  # requests' connection errors are OSErrors too
            raise HubError(
                f"Cannot read {filename} of model {name} from {self.endpoint}: {_short(err)}. {fix.capitalize()}"
            ) from None

    def _probe(self, filename: str) -> str | None:
        """None when the Hub answers (anything below 500); else why it is unreachable."""
        import httpx
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.model_name, filename, revision=REVISION, endpoint=self.endpoint)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = httpx.head(url, headers=headers, timeout=self.timeout, follow_redirects=False)
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if response.status_code >= 500:
            return f"HTTP {response.status_code}"
        return None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
