"""What dstack's container and service fields become in the replica spec and the Serve deployment."""

from __future__ import annotations

from ray_dstack import spec as rt
from ray_dstack.plan import build_plan, defaults
from ray_dstack.plan.container_fields import UNLIMITED_STOP_S
from tests.support.config_helpers import BASE, load


def plan(extra: str, base: str = BASE):
    return build_plan(load(base + extra))


def test_volumes_become_mount_specs_with_dstack_variables_interpolated():
    p = plan("volumes:\n  - /data/hf:/root/.cache/huggingface\n"
             "  - name: ['cache-${{ dstack.node_rank }}', 'c-${{dstack.job_num}}']\n    path: /cache\n"
             "  - {instance_path: /mnt/x, path: /x, optional: true}\n")
    assert p.spec.volumes == [
        rt.MountSpec(kind="instance", instance_path="/data/hf", path="/root/.cache/huggingface"),
        rt.MountSpec(kind="volume", names=["cache-0", "c-0"], path="/cache"),
        rt.MountSpec(kind="instance", instance_path="/mnt/x", path="/x", optional=True),
    ]
    lines = p.summary_lines()
    assert "  volume: node directory /data/hf at /root/.cache/huggingface, created if absent"[2:] in lines
    assert any(line.startswith("volume: cache-0 or c-0 at /cache = <volume root>/cache-0") for line in lines)


def test_a_git_repo_is_cloned_by_each_replica_and_a_local_one_is_left_to_deploy():
    p = plan("repos:\n  - {url: 'ssh://git@example.com/org/r.git', branch: dev, path: /repo}\n")
    assert p.spec.git_repo == rt.GitRepoSpec(url="ssh://git@example.com/org/r.git", branch="dev",
                                             path="/repo", single_branch=True)
    assert any("ssh://***@example.com/org/r.git branch dev cloned by each replica into /repo" in line
               for line in p.summary_lines())
    assert plan("repos: [.]\nsingle_branch: false\n").spec.git_repo is None  # uploaded by deploy
    assert plan("repos: ['https://h/r.git']\nsingle_branch: false\n").spec.git_repo.single_branch is False


def test_shell_user_and_flags():
    p = plan("shell: bash\nuser: '1000:1000'\nstrip_prefix: false\ndstack: true\n")
    assert (p.spec.shell, p.spec.user, p.spec.strip_prefix, p.spec.dstack_api) == ("/bin/bash", "1000:1000", False, True)
    assert plan("shell: /bin/dash\n").spec.shell == "/bin/dash"
    assert plan("").spec.shell is None  # the runtime's default: /bin/bash, /bin/sh in an image


def test_docker_forces_privileged_and_groups_choose_their_own():
    assert (plan("docker: true\n").spec.docker, plan("docker: true\n").spec.privileged) == (True, True)
    text = ("type: service\nport: 8000\nprivileged: true\ngroups:\n"
            "  - {name: a, replicas: 1, commands: [x], docker: true}\n  - {name: b, replicas: 1, commands: [y]}\n")
    groups = build_plan(load(text)).groups
    assert [(g.spec.docker, g.spec.privileged) for g in groups] == [(True, True), (False, True)]


def test_stop_duration_is_the_drain_time_with_dstacks_default():
    assert plan("").deployment["graceful_shutdown_timeout_s"] == defaults.GRACEFUL_SHUTDOWN_TIMEOUT_S == 300.0
    assert plan("stop_duration: 45s\n").deployment["graceful_shutdown_timeout_s"] == 45.0
    assert plan("stop_duration: off\n").deployment["graceful_shutdown_timeout_s"] == UNLIMITED_STOP_S
    finalized = plan("stop_duration: 45s\n").finalized(token_sha256=None, drain_timeout_s=5.0)
    assert finalized.deployment["graceful_shutdown_timeout_s"] == 5.0  # `deploy --drain-timeout` wins


def test_max_duration_hands_a_lifetime_to_the_policy_of_a_fixed_count():
    p = plan("replicas: 2\nmax_duration: 2h\n")
    assert p.spec.max_duration_s == 7200.0
    auto = p.deployment["autoscaling_config"]
    assert "num_replicas" not in p.deployment
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (0, 2, 2)
    kwargs = auto["policy"]["policy_kwargs"]
    assert kwargs["fixed_replicas"] == 2 and kwargs["min_replicas"] == 2
    assert kwargs["lifetime"] == {"deployed_at": None, "crons": [], "max_duration_s": 7200.0}
    finalized = p.finalized(token_sha256=None, created=1_700_000_000)
    assert finalized.deployment["autoscaling_config"]["policy"]["policy_kwargs"]["lifetime"]["deployed_at"] == 1.7e9
    assert p.deployment["autoscaling_config"]["policy"]["policy_kwargs"]["lifetime"]["deployed_at"] is None


def test_max_duration_with_autoscaling_keeps_the_real_minimum_for_the_policy():
    p = plan("replicas: 1..3\nscaling: {metric: rps, target: 5}\nmax_duration: 1h\n")
    auto = p.deployment["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (0, 1, 3)
    kwargs = auto["policy"]["policy_kwargs"]
    assert kwargs["min_replicas"] == 1 and "fixed_replicas" not in kwargs and kwargs["target_rps"] == 5


def test_off_max_duration_is_no_lifetime():
    p = plan("max_duration: off\n")
    assert p.spec.max_duration_s is None and "autoscaling_config" not in p.deployment


def test_fields_left_at_their_defaults_stay_out_of_the_serve_config():
    args = plan("").application()["args"]["service"]
    assert not set(rt.OPTIONAL_SPEC_FIELDS) & set(args)
    args = plan("user: app\nstrip_prefix: false\n").application()["args"]["service"]
    assert (args["user"], args["strip_prefix"]) == ("app", False)
    assert rt.ServiceSpec.model_validate(args).user == "app"


def test_schedule_creates_the_service_with_no_replica_and_shows_the_next_start():
    p = plan("replicas: 2\nschedule: {cron: ['0 9 * * 0', '30 18 * * fri']}\n")
    assert p.spec.schedule == ["0 9 * * 0", "30 18 * * fri"]
    auto = p.deployment["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (0, 0, 2)
    assert auto["policy"]["policy_kwargs"]["lifetime"] == {
        "deployed_at": None, "crons": ["0 9 * * 0", "30 18 * * fri"], "max_duration_s": None}
    line = next(line for line in p.summary_lines() if line.startswith("schedule: "))
    assert "created with 0 replicas, starts at the next cron time" in line and "UTC" in line
