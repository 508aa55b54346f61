"""The CDS service's memo of validated batches (leukofhir/cds/evaluation.py PassedBatches): a batch that passed is not
validated again, anything else is; verdicts are always Great Expectations' own."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pytest

from leukofhir.cds.evaluation import PassedBatches
from leukofhir.config import load_config
from leukofhir.evaluate.validate import suite_parameters, validate_batch


@pytest.fixture(scope="module")
def parameters():
    return suite_parameters(load_config(), now=datetime(2025, 3, 1, tzinfo=timezone.utc))


def counts(value: float = 5.0, unit: str = "10*9/L") -> pd.DataFrame:
    frame = pd.DataFrame(
        [
            dict(
                row_id="0",
                resource_id="Observation/w1",
                version="1",
                concept="wbc",
                code="6690-2",
                value=value,
                patient_id="Patient/p1",
                comparator=None,
                unit=unit,
                status="final",
                time=pd.Timestamp("2025-02-01T08:00:00Z"),
                lln=float("nan"),
                panel=None,
            )
        ]
    )
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


class Counted:
    """validate_batch itself, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return validate_batch(*args)


def test_a_batch_that_passed_is_not_validated_again(parameters):
    gx = Counted()
    memo = PassedBatches(validate=gx)
    first = memo("observations", counts(), parameters)
    again = memo("observations", counts(), parameters)
    assert gx.calls == 1 and not first.reasons and not again.reasons
    assert again.expectations == first.expectations and len(again.valid) == 1


def test_a_changed_value_and_a_failing_batch_are_validated_each_time(parameters):
    gx = Counted()
    memo = PassedBatches(validate=gx)
    memo("observations", counts(5.0), parameters)
    memo("observations", counts(5.5), parameters)
    assert gx.calls == 2
    for _ in range(2):
        failing = memo("observations", counts(unit="furlong"), parameters)
        assert list(failing.reasons) == ["0"] and failing.valid.empty
    assert gx.calls == 4


def test_the_memo_forgets_its_oldest_batches(parameters):
    gx = Counted()
    memo = PassedBatches(size=1, validate=gx)
    memo("observations", counts(5.0), parameters)
    memo("observations", counts(5.5), parameters)
    memo("observations", counts(5.0), parameters)
    assert gx.calls == 3


def test_the_same_values_in_other_types_are_another_batch(parameters):
    gx = Counted()
    memo = PassedBatches(validate=gx)
    memo("observations", counts(), parameters)
    other = counts()
    other["value"] = other["value"].astype("float32")
    memo("observations", other, parameters)
    assert gx.calls == 2
