"""Leukopenia Flags of exactly the patients named, now: the near-real-time path. `leukofhir listen` triggers a run
through the REST API when a FHIR Subscription tells it that a patient's blood count or medication changed, with the
Param `patients` (["Patient/<id>", ...] or bare ids); each patient's whole history is evaluated as of now and their
Flags on the FHIR server converge, as in the hourly surveillance DAG (which stays the safety net for notifications
the server drops). One task: the measured fastest shape for a few patients (docs/near-real-time.md)."""

from datetime import datetime, timezone

from airflow.sdk import Param, dag

from leukofhir.airflow.tasks import PATIENTS_DEFAULT_ARGS, process_patients


@dag(
    dag_id="leukopenia_patients",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    # Runs come from the receiver: a DAG paused at creation would hold them all queued until someone unpauses it.
    is_paused_upon_creation=False,
    default_args=PATIENTS_DEFAULT_ARGS,
    params={
        # FHIR ids (R4: [A-Za-z0-9\-.]{1,64}; not dots only: `.` and `..` are URL dot-segments, leukofhir/fhir/ids.py),
        # as the receiver sends them; Airflow refuses a run with anything else.
        "patients": Param(
            type="array",
            minItems=1,
            items={"type": "string", "pattern": r"^(Patient/)?(?!\.+$)[A-Za-z0-9\-.]{1,64}$"},
            description="the patients to evaluate: Patient/<id> or <id>",
        ),
    },
    tags=["leukofhir"],
    doc_md=__doc__,
)
def leukopenia_patients():
    process_patients()


patients = leukopenia_patients()
