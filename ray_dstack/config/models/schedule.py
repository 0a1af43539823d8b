"""`schedule`: when a service starts, as dstack reads it (`core/models/profiles.py` `Schedule`, `utils/cron.py`).

`schedule: {cron: "0 9 * * 0"}` or a list of expressions: UTC, POSIX's five fields read by apscheduler's
`CronTrigger.from_crontab`, so day-of-week 0 is **Monday** (dstack documents it; `mon`..`sun` also work).
A service with a schedule is created with 0 replicas and starts at the next cron time after its first deploy;
the schedule never stops it (`max_duration` does). The autoscaling policy carries its own copy of `next_start`
(ray_dstack/serve/scaling/autoscaling_policy.py must import nothing of ray_dstack).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Union

from pydantic import Field, field_validator

from ray_dstack.config.models.common import CoreModel
from ray_dstack.config.models.validation import PROBLEM_SEP, at


@lru_cache(maxsize=256)
def _trigger(expression: str) -> Any:
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(expression, timezone="UTC")


def check_cron(expression: Any) -> str:
    """One expression, validated as dstack validates it; ValueError with apscheduler's reason otherwise."""
    if not isinstance(expression, str):
        raise ValueError(f"a cron expression is a string, got {expression!r}")
    try:
        trigger = _trigger(expression)
    except ValueError as exc:
        raise ValueError(f"invalid cron expression `{expression}`: {exc}") from None
    # `0 0 30 2 *` parses but never fires: such a service would never start.
    if trigger.get_next_fire_time(None, datetime.now(timezone.utc)) is None:
        raise ValueError(f"cron expression `{expression}` never fires")
    return expression


class ScheduleConfig(CoreModel):
    """When the service starts: cron expressions in UTC (dstack's `schedule`)."""

    cron: Union[str, list[str]] = Field(
        description="A cron expression or a list of them (UTC; day-of-week 0 = Monday): the service starts at the "
        "next of these times after it was deployed, and again after each `max_duration` stop")

    @field_validator("cron", mode="before")
    @classmethod
    def _check(cls, value: Any) -> Any:
        if isinstance(value, str):
            return check_cron(value)
        if not isinstance(value, list):
            raise ValueError("`cron` is a cron expression or a list of them")
        if not value:
            raise ValueError("At least one cron expression must be specified")
        problems = []
        for index, expression in enumerate(value):
            try:
                check_cron(expression)
            except ValueError as exc:
                problems.append(at(str(index), str(exc)))
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return value

    @property
    def crons(self) -> list[str]:
        return [self.cron] if isinstance(self.cron, str) else list(self.cron)


def next_start(crons: list[str], after: datetime) -> datetime | None:
    """The earliest fire time of `crons` strictly after `after` (naive = UTC); None if none ever fires again."""
    if after.tzinfo is None:
        after = after.replace(tzinfo=timezone.utc)
    # apscheduler answers the first fire time at or after `now`, rounding up to the second: a microsecond past
    # `after` makes it strictly later (a stop at a fire time waits for the next one, as dstack's does).
    now = after + timedelta(microseconds=1)
    times = [t for t in (_trigger(c).get_next_fire_time(None, now) for c in crons) if t is not None]
    return min(times).astimezone(timezone.utc) if times else None
