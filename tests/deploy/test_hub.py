"""resolve_chat_settings: YAML wins, else the model's tokenizer_config.json on the (fake) Hugging Face Hub."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ray_dstack.errors import RayDstackError
from ray_dstack.deploy.hub import ChatSettings, HubError, resolve_chat_settings
from ray_dstack.openai.templates import ChatTemplate
from tests.servers.hub_server import NO_ACCESS_TOKEN, VALID_TOKEN, HubServer, free_port_url, hub_server  # noqa: F401

HUB = Path(__file__).parent.parent / "fixtures" / "hub"


@pytest.fixture
def resolve(hub_server, tmp_path):  # noqa: F811
    def _resolve(name, *, chat_template=None, eos_token=None, env=None, **kwargs):
        env = {"HF_ENDPOINT": hub_server.url, **(env or {})}
        return resolve_chat_settings(name, chat_template=chat_template, eos_token=eos_token, env=env,
                                     cache_dir=tmp_path / "hf-cache", **kwargs)

    return _resolve


def test_yaml_values_win_without_contacting_the_hub(resolve, hub_server):  # noqa: F811
    s = resolve("meta-llama/Llama-2-7b-chat-hf", chat_template="{{ messages[0].content }}", eos_token="<|end|>")
    assert s == ChatSettings(chat_template="{{ messages[0].content }}", eos_token="<|end|>", bos_token=None,
                             source="yaml")
    assert hub_server.requests == []


def test_reads_tokenizer_config_from_hub(resolve, hub_server):  # noqa: F811
    s = resolve("mistralai/Mistral-7B-Instruct-v0.1")
    config = json.loads((HUB / "mistralai/Mistral-7B-Instruct-v0.1/tokenizer_config.json").read_text())
    assert s.chat_template == config["chat_template"]
    assert (s.eos_token, s.bos_token, s.source) == ("</s>", "<s>", "hub")
    assert {r.path for r in hub_server.requests} == {"/mistralai/Mistral-7B-Instruct-v0.1/resolve/main/tokenizer_config.json"}
    assert all(r.authorization is None for r in hub_server.requests)
    prompt = ChatTemplate(s.chat_template, bos_token=s.bos_token, eos_token=s.eos_token).render(
        [{"role": "user", "content": "hi"}])
    assert prompt == "<s>[INST] hi [/INST]"


def test_yaml_template_with_eos_from_hub(resolve):
    s = resolve("HuggingFaceH4/zephyr-7b-beta", chat_template="{{ bos_token }}{{ messages[0].content }}")
    assert (s.chat_template, s.eos_token, s.bos_token, s.source) == (
        "{{ bos_token }}{{ messages[0].content }}", "</s>", "<s>", "yaml+hub")
    s = resolve("HuggingFaceH4/zephyr-7b-beta", eos_token="<|user|>")
    assert s.eos_token == "<|user|>" and s.source == "yaml+hub" and "<|assistant|>" in s.chat_template


def test_added_token_dicts(resolve):
    s = resolve("meta-llama/Llama-2-7b-chat-hf", env={"HF_TOKEN": VALID_TOKEN})
    assert (s.bos_token, s.eos_token) == ("<s>", "</s>")
    s = resolve("acme/separate-jinja")  # eos as AddedToken dict, template in chat_template.jinja
    assert s.eos_token == "<|end|>" and s.chat_template.startswith("{% for message in messages %}")


def test_named_templates_list_uses_default(resolve):
    s = resolve("NousResearch/Hermes-2-Pro-Llama-3-8B")
    assert s.chat_template.startswith("{{bos_token}}{% for message in messages %}")
    assert (s.bos_token, s.eos_token) == ("<|begin_of_text|>", "<|im_end|>")


def test_null_bos_token(resolve):
    s = resolve("Qwen/Qwen2.5-7B-Instruct")
    assert s.bos_token is None and s.eos_token == "<|im_end|>"


def test_gated_repo(resolve, hub_server):  # noqa: F811
    with pytest.raises(HubError) as err:
        resolve("meta-llama/Meta-Llama-3-8B-Instruct")
    assert "gated" in str(err.value) and "set HF_TOKEN in the service env" in str(err.value)
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in str(err.value)
    with pytest.raises(HubError, match="has no access"):
        resolve("meta-llama/Meta-Llama-3-8B-Instruct", env={"HF_TOKEN": NO_ACCESS_TOKEN})
    with pytest.raises(HubError, match="rejected the token"):
        resolve("meta-llama/Meta-Llama-3-8B-Instruct", env={"HF_TOKEN": "hf_wrong"})
    s = resolve("meta-llama/Meta-Llama-3-8B-Instruct", env={"HUGGING_FACE_HUB_TOKEN": VALID_TOKEN})
    assert s.eos_token == "<|eot_id|>" and s.bos_token == "<|begin_of_text|>"
    assert hub_server.requests[-1].authorization == f"Bearer {VALID_TOKEN}"


def test_process_token_is_not_used(resolve, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    with pytest.raises(HubError, match="gated"):
        resolve("meta-llama/Meta-Llama-3-8B-Instruct")


def test_unknown_repo(resolve):
    with pytest.raises(HubError) as err:
        resolve("nobody/no-such-model")
    assert isinstance(err.value, RayDstackError)
    assert "nobody/no-such-model was not found" in str(err.value) and "`model.name`" in str(err.value)
    with pytest.raises(HubError, match="not a valid Hugging Face repo id"):
        resolve("not a repo!")


@pytest.mark.parametrize("repo", ["openai-community/gpt2", "acme/no-tokenizer-config"])
def test_no_chat_template(resolve, repo):
    with pytest.raises(HubError) as err:
        resolve(repo)
    assert f"Model {repo} has no chat template" in str(err.value)
    assert "set `model.chat_template`" in str(err.value)
    s = resolve(repo, chat_template="{{ messages[0].content }}")  # the YAML fills the gap
    assert s.source == "yaml+hub"


def test_broken_template_fails_at_resolve_time(resolve):
    with pytest.raises(HubError, match="does not compile") as err:
        resolve("openai-community/gpt2", chat_template="{% for m in messages %}", eos_token="</s>")
    assert "`model.chat_template`" in str(err.value)


def test_hub_unreachable_and_failing(resolve, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(HubError) as err:
        resolve("mistralai/Mistral-7B-Instruct-v0.1", env={"HF_ENDPOINT": free_port_url()})
    assert "unreachable" in str(err.value) and "set `model.chat_template` and `model.eos_token`" in str(err.value)
    with pytest.raises(HubError, match="HTTP 500"):
        resolve("acme/server-error")
    assert time.monotonic() - t0 < 5  # no 25-second retry loop


def test_cached_file_used_when_hub_is_unreachable(resolve):
    first = resolve("Qwen/Qwen2.5-7B-Instruct")
    again = resolve("Qwen/Qwen2.5-7B-Instruct", env={"HF_ENDPOINT": free_port_url()})
    assert again == first


def test_hf_endpoint_per_call(tmp_path, monkeypatch):
    with HubServer() as a, HubServer() as b:
        monkeypatch.setenv("HF_ENDPOINT", a.url)
        resolve_chat_settings("teknium/OpenHermes-2.5-Mistral-7B", chat_template=None, eos_token=None, env={},
                              cache_dir=tmp_path / "c1")
        assert a.requests and not b.requests
        resolve_chat_settings("teknium/OpenHermes-2.5-Mistral-7B", chat_template=None, eos_token=None,
                              env={"HF_ENDPOINT": b.url}, cache_dir=tmp_path / "c2")
        assert b.requests
        n_a = len(a.requests)
        resolve_chat_settings("teknium/OpenHermes-2.5-Mistral-7B", chat_template=None, eos_token=None,
                              env={"HF_ENDPOINT": b.url + "/"}, cache_dir=tmp_path / "c3")
        assert len(a.requests) == n_a
