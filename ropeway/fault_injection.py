"""Test-only fault injection: make the engine raise at one stage of its work on chosen requests.

Tests arm a stage with a marker (`arm("sample", "<<fault>>")`); a request whose prompt contains
the marker becomes a target when it is admitted, and the engine raises `InjectedFault` when it
reaches that stage for a target. An engine-core process reads its arming from the environment
(ROPEWAY_FAULT_INJECTION='{"sample": "<<fault>>"}'), so the same faults reach `ropeway serve`.
Nothing is armed in production, and then each check is one dictionary test.

Stages, in the order a request meets them: admit, schedule, execute, sample, report; and stats
(the snapshot after a step, armed with any marker: it belongs to no request).
"""

import json
import os

STAGES = ("admit", "schedule", "execute", "sample", "report", "stats")
ENVIRONMENT_VARIABLE = "ROPEWAY_FAULT_INJECTION"

_markers: dict[str, str] = {}           # stage -> marker in a target's prompt
_targets: dict[str, set[str]] = {}      # stage -> request ids of the targets admitted so far


class InjectedFault(RuntimeError):
    """The fault a test asked for."""


def arm(stage: str, marker: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    _markers[stage] = marker
    _targets[stage] = set()


def disarm() -> None:
    _markers.clear()
    _targets.clear()


def is_armed() -> bool:
    return bool(_markers)


def note_prompt(request_id: str, prompt_text: str) -> None:
    """At admission: mark the request as a target of every stage whose marker its prompt holds."""
    for stage, marker in _markers.items():
        if marker in prompt_text:
            _targets[stage].add(request_id)


def check(stage: str, request_id: str | None = None) -> None:
    """Raise InjectedFault if stage is armed for this request (for stats: armed at all)."""
    if not _markers or stage not in _markers:
        return
    if stage == "stats" or request_id in _targets[stage]:
        raise InjectedFault(f"fault injected at stage {stage!r}")


def arm_from_environment() -> None:
    for stage, marker in json.loads(os.environ.get(ENVIRONMENT_VARIABLE) or "{}").items():
        arm(stage, marker)
