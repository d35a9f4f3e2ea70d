"""The chaos scenarios of `make chaos` (loadtest/chaos.py) at a small scale: `personalize up --workers 3`
on SeaweedFS, each worker behind a fault proxy, under a light Generate + SubmitFeedback load while a worker
is SIGKILLed, the trainer is SIGKILLed mid-round, Valkey is killed and restarted on its AOF, S3 is down for
a few seconds, an adapter object is corrupted, and the router is cut off from one worker.

After every fault and at the end: no acknowledged feedback event lost or applied twice, checked against the
event ids each stored version lists as trained on (not the trainer's examples_seen), no dead letters,
no Generate failure outside a fault window, the corrupted version never served with other output, and
the S3 secret in no log.
"""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.chaos import FAULTS, ChaosConfig, run_chaos, table

CONFIG = ChaosConfig(users=8, clients=2, hold_s=4.0, calm_s=2.0, settle_timeout_s=120.0, drain_timeout_s=120.0)


def test_no_acked_feedback_is_lost_or_applied_twice_under_every_fault(tmp_path: Path) -> None:
    summary = run_chaos(CONFIG, tmp_path)
    report = f"{table(summary)}\nviolations: {summary['violations']}\nwork dir: {tmp_path}"
    assert list(summary["faults"]) == list(FAULTS), report
    assert all(f["recovery_s"] is not None and not f["error"] for f in summary["faults"].values()), report
    assert summary["events_sent"] > 0 and summary["events_acked"] == summary["events_sent"], report
    assert summary["lost"] == 0 and summary["applied_twice"] == 0 and summary["unknown_ids"] == 0, report
    # Every acked id is listed by exactly one version; those of the version corrupt_adapter destroyed apart.
    assert summary["events_applied"] + summary["destroyed_by_fault"] == summary["events_acked"], report
    assert summary["events_applied"] > 0, report
    assert summary["dead_letters"] == 0, report
    assert summary["failed_outside_fault"] == [], report
    assert summary["generate_calls"] > 0 and summary["faults"]["corrupt_adapter"]["detail"]["served_corrupt"] == 0
    assert all(check["ok"] for check in summary["checks"]), summary["checks"]
    assert summary["ok"], report
    secret = json.loads((tmp_path / "s3" / "s3.json").read_text())["identities"][0]["credentials"][0]["secretKey"]
    logs = [tmp_path / "up.log", *(tmp_path / "data").rglob("*.log")]
    assert len(logs) > 3 and not [log for log in logs if secret in log.read_text(errors="replace")]  # no secret
