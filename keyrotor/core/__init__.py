"""keyrotor's sans-IO core: key rotation and health as a pure state machine.

Feed ``Pool.handle`` events (``RequestStarted``, ``ResponseReceived``, ...,
each carrying ``now``) and act on the decisions it returns (``Send``,
``Deliver``, ``Reject``, ``Probe``, ``KeyStateChanged``). Tick at
``Pool.next_deadline()``. No I/O, no clock, no threads: same events in, same
decisions out. Depends on ``attrs`` only.
"""

from .classify import (
    Classification,
    Verdict,
    classify_probe,
    classify_response,
    cooldown_from_headers,
    parse_duration,
    parse_retry_after,
)
from .config import POLICIES, KeySpec, Policy, PoolConfig
from .decisions import Decision, Deliver, KeyStateChanged, Probe, Reject, Send
from .errors import PoolError
from .events import (
    AttemptHeld,
    Event,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    ProbeFinished,
    ProbeRequested,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    SpendRecorded,
    Tick,
    TransportFailed,
    request_started,
    response_finished,
    response_received,
)
from .pool import NOT_THE_KEYS_FAULT, SNAPSHOT_VERSION, Pool
from .states import TRANSITIONS, USABLE_STATES, KeyState, Signal, next_state
from .statistics import KeyStatistics, PoolStatistics

__all__ = [
    "NOT_THE_KEYS_FAULT",
    "POLICIES",
    "SNAPSHOT_VERSION",
    "TRANSITIONS",
    "USABLE_STATES",
    "AttemptHeld",
    "Classification",
    "Decision",
    "Deliver",
    "Event",
    "KeyAdded",
    "KeyMarked",
    "KeyRemoved",
    "KeySpec",
    "KeyState",
    "KeyStateChanged",
    "KeyStatistics",
    "Policy",
    "Pool",
    "PoolConfig",
    "PoolError",
    "PoolStatistics",
    "Probe",
    "ProbeFinished",
    "ProbeRequested",
    "Reject",
    "RequestCancelled",
    "RequestStarted",
    "ResponseFinished",
    "ResponseReceived",
    "Send",
    "Signal",
    "SpendRecorded",
    "Tick",
    "TransportFailed",
    "Verdict",
    "classify_probe",
    "classify_response",
    "cooldown_from_headers",
    "next_state",
    "parse_duration",
    "parse_retry_after",
    "request_started",
    "response_finished",
    "response_received",
]
