"""The CLI with replica groups: a redeploy that changes the router group in place is refused before anything
changes (dstack's rule, spec §1.4); `logs --group` picks a group's replicas."""

from __future__ import annotations

import pytest

from ray_dstack.cli import service_cmds, status_cmds
from ray_dstack.cli.main import main
from ray_dstack.deploy import apps
from ray_dstack.errors import UsageError
from tests.deploy.group_fixtures import (
    MEMBERS_SVC, ROUTER_SVC, FakeClient, app, app_config, deployment, details, plan_of, replica,
)
from tests.deploy.test_status_summary import _details

PLAIN_SVC = "type: service\nname: chat\ncommands: [x]\nport: 8000\n"
RENAMED = ROUTER_SVC.replace("name: router", "name: front")
MOVED = ROUTER_SVC.replace("    router: {type: ROUTER}\n", "").replace(
    "    scaling: {metric: rps, target: 10}\n", "    scaling: {metric: rps, target: 10}\n    router: {type: ROUTER}\n"
).replace("replicas: 1..3", "replicas: 1").replace("    scaling: {metric: rps, target: 10}\n", "")


def specs(text: str, router: str = "sglang") -> list:
    return [g.spec for g in plan_of(text, router).groups]


def running(text: str, router: str = "sglang") -> dict:
    """The running app's config (deployed_app_config), as deploy reads it from the cluster."""
    return app_config(text, router)


def refusal(old: dict, new: list) -> str:
    with pytest.raises(UsageError) as err:
        apps.check_router_unchanged("chat", old, new)
    assert err.value.exit_code == 2
    return str(err.value)


def test_the_running_apps_group_specs_are_in_file_order():
    assert [(s.group.name, s.group.role) for s in apps.group_specs(running(ROUTER_SVC))] == [
        ("router", "router"), ("workers", "worker")]
    assert apps.group_specs(app_config(PLAIN_SVC)) == [] and apps.group_specs(None) == []
    assert apps.router_of(apps.group_specs(running(ROUTER_SVC, "dynamo"))) == ("router", "dynamo")
    assert apps.router_of(apps.group_specs(running(MEMBERS_SVC))) is None


def test_in_place_changes_that_keep_the_router_are_allowed():
    apps.check_router_unchanged("chat", running(ROUTER_SVC), specs(ROUTER_SVC.replace("1..3", "2..4")))
    apps.check_router_unchanged("chat", running(MEMBERS_SVC), specs(MEMBERS_SVC.replace("replicas: 2", "replicas: 3")))
    apps.check_router_unchanged("chat", running(PLAIN_SVC), specs(MEMBERS_SVC))  # no router either way
    apps.check_router_unchanged("chat", None, specs(ROUTER_SVC))  # a first deploy: nothing to compare
    apps.check_router_unchanged("chat", {"import_path": "x:y"}, specs(ROUTER_SVC))  # not a service (refused elsewhere)
    apps.check_router_unchanged("chat", running(MEMBERS_SVC), specs(PLAIN_SVC))


def test_router_changes_are_refused():
    assert refusal(running(ROUTER_SVC), specs(ROUTER_SVC, "dynamo")) == (
        "the router group of service 'chat' cannot change in place (router group 'router', type sglang → dynamo): "
        "delete the service (`ray-dstack delete chat`) and deploy it again")
    assert "(adds the sglang router group 'router')" in refusal(running(PLAIN_SVC), specs(ROUTER_SVC))
    assert "(adds the sglang router group 'router')" in refusal(running(MEMBERS_SVC), specs(ROUTER_SVC))
    assert "(removes the sglang router group 'router')" in refusal(running(ROUTER_SVC), specs(MEMBERS_SVC))
    assert "(removes the dynamo router group 'router')" in refusal(running(ROUTER_SVC, "dynamo"), specs(PLAIN_SVC))
    assert "(moves the router from group 'router' to group 'front')" in refusal(running(ROUTER_SVC), specs(RENAMED))
    assert "(moves the router from group 'router' to group 'workers')" in refusal(running(ROUTER_SVC), specs(MOVED))


def _deploy(monkeypatch, tmp_path, capsys, running_cfg: dict | None, new_text: str, router: str = "sglang"):
    monkeypatch.setenv("RAY_DSTACK_HOME", str(tmp_path / "home"))
    client = FakeClient(serve=[details({} if running_cfg is None else {
        "chat": app(running_cfg, {"ServiceReplica": deployment([replica("r1")])})})])
    monkeypatch.setattr(service_cmds, "connect", lambda *a, **k: (client, False))
    handed: list = []
    monkeypatch.setattr(service_cmds, "hand_over_registry_auth", lambda *a: handed.append(a) or (None, None))
    f = tmp_path / "chat.dstack.yml"
    f.write_text(new_text.replace("ROUTER", router))
    code = main(["deploy", str(f), "--detach"])
    return code, client, handed, capsys.readouterr()


def test_deploy_refuses_a_router_change_before_anything_changes(monkeypatch, tmp_path, capsys):
    code, client, handed, out = _deploy(monkeypatch, tmp_path, capsys, app_config(ROUTER_SVC), ROUTER_SVC, "dynamo")
    assert code == 2
    assert "error: the router group of service 'chat' cannot change in place (router group 'router', type " \
           "sglang → dynamo)" in out.err
    assert client.put == [] and handed == []  # no Serve config written, no credentials handed over
    assert not (tmp_path / "home").exists()  # no token saved


def test_deploy_goes_on_when_the_router_is_kept(monkeypatch, tmp_path, capsys):
    code, client, handed, out = _deploy(monkeypatch, tmp_path, capsys, app_config(ROUTER_SVC),
                                        ROUTER_SVC.replace("1..3", "2..4"))
    assert code == 0, out.err
    [put] = client.put
    [chat] = [a for a in put["applications"] if a["name"] == "chat"]
    assert [d["name"] for d in chat["deployments"]] == ["ServiceReplica", "ServiceReplica-workers"]


def test_a_first_deploy_with_a_router_group_goes_on(monkeypatch, tmp_path, capsys):
    code, client, handed, out = _deploy(monkeypatch, tmp_path, capsys, None, ROUTER_SVC)
    assert code == 0, out.err
    assert len(client.put) == 1


# --- logs --group -------------------------------------------------------------------------------------


def _logs(monkeypatch, capsys, cfg: dict, deployments: dict, *args: str):
    logs = {f"/serve/{rid}.log": f"log of {rid}\n" for rid in ("r1", "w1", "w2", "a1")}
    client = FakeClient(logs, serve=[details({"chat": app(cfg, deployments)})])
    monkeypatch.setattr(status_cmds, "connect", lambda *a, **k: (client, False))
    code = main(["logs", "chat", *args])
    return code, capsys.readouterr()


GROUPED = {"ServiceReplica": deployment([replica("r1")]),
           "ServiceReplica-workers": deployment([replica("w1", node="n2", ip="10.0.0.2"), replica("w2")])}


def test_logs_of_the_ingress_group_by_default(monkeypatch, capsys):
    code, out = _logs(monkeypatch, capsys, app_config(), GROUPED)
    assert code == 0 and out.out == "log of r1\n"


def test_logs_of_a_group(monkeypatch, capsys):
    code, out = _logs(monkeypatch, capsys, app_config(), GROUPED, "--group", "workers")
    assert code == 0
    assert out.out == ("==> replica w1 (group workers) on 10.0.0.2 <==\nlog of w1\n"
                       "==> replica w2 (group workers) on 10.0.0.1 <==\nlog of w2\n")
    code, out = _logs(monkeypatch, capsys, app_config(), GROUPED, "--replica", "w2")  # any group
    assert code == 0 and out.out == "log of w2\n"


def test_logs_of_an_unknown_group(monkeypatch, capsys):
    code, out = _logs(monkeypatch, capsys, app_config(), GROUPED, "--group", "nope")
    assert code == 2
    assert "service 'chat' has no replica group 'nope'; its groups: router, workers" in out.err
    code, out = _logs(monkeypatch, capsys, app_config(), {"ServiceReplica": deployment([replica("r1")])},
                      "--group", "workers")
    assert code == 1 and "group 'workers' of service 'chat' has no replica with logs yet" in out.err


def test_logs_of_a_service_without_groups(monkeypatch, capsys):
    cfg = _details(PLAIN_SVC)["applications"]["svc"]["deployed_app_config"]
    plain = {"ServiceReplica": deployment([replica("a1")])}
    code, out = _logs(monkeypatch, capsys, cfg, plain)
    assert code == 0 and out.out == "log of a1\n"
    code, out = _logs(monkeypatch, capsys, cfg, plain, "--group", "x")
    assert code == 2 and "service 'chat' has no replica groups (--group x)" in out.err


def test_logs_help_names_group(capsys):
    with pytest.raises(SystemExit):
        main(["logs", "--help"])
    assert "--group NAME" in capsys.readouterr().out


def test_deploy_waits_for_every_group_and_prints_them(monkeypatch, tmp_path, capsys):
    from tests.deploy.group_fixtures import TWO_WORKERS, router_line

    monkeypatch.setenv("RAY_DSTACK_HOME", str(tmp_path / "home"))
    cfg = app_config(ROUTER_SVC)
    before = details({"chat": app(cfg, {"ServiceReplica": deployment([replica("r0")])}, deployed=1.0)})
    after = details({"chat": app(cfg, {**GROUPED, "ServiceReplica-workers": deployment(
        [replica("w1", node="n2", ip="10.0.0.2"), replica("w2")])}, deployed=2.0)})
    client = FakeClient({"/serve/r1.log": router_line(TWO_WORKERS)}, serve=[before, after])
    monkeypatch.setattr(service_cmds, "connect", lambda *a, **k: (client, False))
    f = tmp_path / "chat.dstack.yml"
    f.write_text(ROUTER_SVC.replace("ROUTER", "sglang"))
    assert main(["deploy", str(f), "--timeout", "20"]) == 0
    out = capsys.readouterr()
    assert "  RUNNING: router 1/1, workers 2/2 replicas running (router: r1 RUNNING; workers: w1 RUNNING, " \
           "w2 RUNNING)" in out.err
    assert "router r1" not in out.err  # a router that answers from the start needs no line while deploy waits
    assert "Service chat is ready: 3/3 (router 1/1, workers 2/2) replicas at http://head.example:8100/chat/" in out.out
    assert "  router: lists 2 worker(s): http://10.0.0.2:40001 (regular, healthy)" in out.out


def test_a_dynamo_router_group_never_changes_in_place_but_its_workers_may():
    """dstack (spec §1.7): the workers hold the router's address and registered with it."""
    old = running(ROUTER_SVC, "dynamo")
    apps.check_router_unchanged("chat", old, specs(ROUTER_SVC.replace("1..3", "2..4"), "dynamo"))  # scaling
    apps.check_router_unchanged("chat", old, specs(ROUTER_SVC.replace("serve --port", "serve -v --port"), "dynamo"))
    message = refusal(old, specs(ROUTER_SVC.replace("smg launch", "python -m dynamo.frontend"), "dynamo"))
    assert "Dynamo router group of service 'chat' cannot change in place (changed: commands;" in message
    shared = refusal(old, specs(ROUTER_SVC.replace("url: /health", "url: /ready"), "dynamo"))
    assert "(changed: probes;" in shared
    # An SGLang router may change in place: ray-dstack tells the new router its workers.
    apps.check_router_unchanged("chat", running(ROUTER_SVC), specs(ROUTER_SVC.replace("smg launch", "smg launch -v")))
