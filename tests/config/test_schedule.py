"""`schedule`: dstack's cron expressions (apscheduler's reading: UTC, day-of-week 0 = Monday) and the next start."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from ray_dstack.config.models.schedule import ScheduleConfig, check_cron, next_start
from ray_dstack.config.models.validation import PROBLEM_SEP


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def problems(value) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ScheduleConfig.model_validate({"cron": value})
    [error] = info.value.errors()
    assert error["loc"] == ("cron",)
    return error["msg"].removeprefix("Value error, ").split(PROBLEM_SEP)


def test_one_expression_or_a_list():
    assert ScheduleConfig.model_validate({"cron": "0 9 * * mon-fri"}).crons == ["0 9 * * mon-fri"]
    assert ScheduleConfig.model_validate({"cron": ["0 9 * * *", "30 17 * * 4"]}).crons == ["0 9 * * *", "30 17 * * 4"]


def test_at_least_one_expression():
    assert problems([]) == ["At least one cron expression must be specified"]


def test_an_invalid_expression_is_named_with_its_index_and_apschedulers_reason():
    assert problems(["0 9 * * *", "61 * * * *", "* * *"]) == [
        "@1:invalid cron expression `61 * * * *`: Error validating expression '61': the last value (61) is higher "
        "than the maximum value (59)",
        "@2:invalid cron expression `* * *`: Wrong number of fields; got 3, expected 5",
    ]
    assert problems("0 0 * * 7") == [  # dstack's numbering stops at 6 (Sunday)
        "invalid cron expression `0 0 * * 7`: Error validating expression '7': the last value (7) is higher than "
        "the maximum value (6)"]
    assert problems([12]) == ["@0:a cron expression is a string, got 12"]
    with pytest.raises(ValidationError, match="extra"):
        ScheduleConfig.model_validate({"cron": "0 9 * * *", "timezone": "CET"})


def test_an_expression_that_never_fires_is_refused():
    with pytest.raises(ValueError, match=r"cron expression `0 0 30 2 \*` never fires"):
        check_cron("0 0 30 2 *")


def test_day_of_week_0_is_monday_as_in_dstack():
    # 2026-01-01 is a Thursday.
    monday = next_start(["0 9 * * 0"], utc(2026, 1, 1))
    assert monday == utc(2026, 1, 5, 9) and monday.strftime("%A") == "Monday"
    assert next_start(["0 9 * * 6"], utc(2026, 1, 1)).strftime("%A") == "Sunday"
    assert next_start(["0 9 * * sun"], utc(2026, 1, 1)) == utc(2026, 1, 4, 9)


def test_next_start_is_the_earliest_of_several_crons_strictly_after():
    crons = ["0 12 * * *", "30 8 * * *"]
    assert next_start(crons, utc(2026, 3, 2, 7)) == utc(2026, 3, 2, 8, 30)
    assert next_start(crons, utc(2026, 3, 2, 9)) == utc(2026, 3, 2, 12)
    # At a fire time exactly: the next one (a service stopped at that moment waits for it).
    assert next_start(crons, utc(2026, 3, 2, 12)) == utc(2026, 3, 3, 8, 30)
    # Naive times are UTC.
    assert next_start(crons, datetime(2026, 3, 2, 9)) == utc(2026, 3, 2, 12)


def test_in_a_file_the_problem_names_the_expression_and_its_line():
    from tests.support.config_helpers import BASE, errors, load

    assert load(BASE + "schedule:\n  cron: '0 9 * * 0'\n").config.schedule.crons == ["0 9 * * 0"]
    err = errors(BASE + "schedule:\n  cron:\n    - '0 9 * * *'\n    - '0 25 * * *'\n")
    [problem] = err.problems
    assert (problem.path, problem.line) == ("schedule.cron[1]", 7)
    assert problem.message.startswith("invalid cron expression `0 25 * * *`: Error validating expression '25'")
    [problem] = errors(BASE + "schedule: {cron: []}\n").problems
    assert (problem.path, problem.message) == ("schedule.cron", "At least one cron expression must be specified")
