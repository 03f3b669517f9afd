"""A ``status.json`` field of the wrong type or range is a problem line, never a number on screen."""

from __future__ import annotations

import json

from megatron_qwenimage.monitor.snapshot import STATUS_FIELDS, check_status
from tests.monitor.fixtures import TELEMETRY, build_cache, cli_main, status_record, write_text

#: field -> a value that breaks its rule (wrong type or out of range).
BAD = {
    "committed": -3,
    "inputs": "50",
    "read": 2.5,
    "updated_unix": "yesterday",
    "images_per_s": -1.0,
    "metrics_port": 70000,
    "stage_busy": {"vae": 1.5},
    "quarantined": {"corrupt_image": -2},
    "pool_bounds": {"vae": [3, 1]},
    "state": 7,
}


def write_bad_status(cache: str) -> str:
    status = status_record(len(TELEMETRY) - 1)
    status.update(BAD)
    path = f"{cache}/status.json"
    write_text(path, json.dumps(status))
    return path


def test_each_bad_field_is_one_problem_line_naming_the_file_and_field(tmp_path, capsys):
    cache = build_cache(str(tmp_path / "cache"))
    path = write_bad_status(cache)
    rc, out, err = cli_main(["monitor", "--cache", cache, "--once", "--json"], capsys)
    assert rc == 0, err
    snap = json.loads(out)
    producer = snap["producer"]
    for field in ("committed", "inputs", "read", "images_per_s", "metrics_port", "stage_busy", "quarantined"):
        assert producer[field] is None, field
    assert producer["pool_bounds"] is None and producer["state"] is None and producer["updated_unix"] is None
    assert producer["remaining_inputs"] is None  # nothing is computed from a bad field either
    assert producer["duplicates"] == 0 and producer["encoded"] == 36  # the good fields still show
    problems = [w for w in snap["warnings"] if w.startswith(f"{path}: field ")]
    assert len(problems) == len(BAD), snap["warnings"]
    for field, value in BAD.items():
        (line,) = [w for w in problems if w.startswith(f"{path}: field {field!r} is {json.dumps(value)}, expected ")]
        assert line.endswith(f"expected {STATUS_FIELDS[field].expected}; shown as n/a"), line

    rc, out, err = cli_main(["monitor", "--cache", cache, "--once"], capsys)
    assert rc == 0, err
    shown, warnings = out.split("\nWarnings:\n")
    assert "-3" not in shown and "inputs n/a, committed n/a" in shown
    assert f"{path}: field 'committed' is -3, expected a whole number >= 0; shown as n/a" in warnings


def test_good_and_absent_fields_pass_and_nulls_read_as_absent():
    good = status_record(len(TELEMETRY) - 1)
    assert check_status(good) == (good, {})
    clean, problems = check_status({"committed": None, "future_field": -1, "committed_per_s": 0})
    assert problems == {} and clean == {"committed": None, "future_field": -1, "committed_per_s": 0}
