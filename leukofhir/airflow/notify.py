"""The surveillance DAGs' own failures told to the site: Airflow notifiers (SMTP, Slack when their providers are
installed) chosen by the environment, as `on_failure_callback`; run ids and counts only, never patient data."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Read at parse time from the environment only (no connection, no I/O): an address list, a Slack channel.
EMAIL_ENV = "LEUKOFHIR_NOTIFY_EMAIL"  # e.g. "oncall@hospital.example,lab-it@hospital.example"
SMTP_CONN_ENV = "LEUKOFHIR_NOTIFY_SMTP_CONN"  # default: Airflow's [email] email_conn_id (smtp_default)
SLACK_CHANNEL_ENV = "LEUKOFHIR_NOTIFY_SLACK_CHANNEL"  # e.g. "#leukofhir-ops"
SLACK_CONN_ENV = "LEUKOFHIR_NOTIFY_SLACK_CONN"  # default slack_api_default

SUBJECT = "leukofhir: {{ dag.dag_id }} failed (run {{ run_id }})"
# Ids and counts only: the DAG, the run, the task, its map index and try. The task's log says why (it holds resource
# ids, never patient data).
MESSAGE = (
    "leukofhir: task {{ ti.task_id }}{% if ti.map_index is not none and ti.map_index >= 0 %}"
    "[{{ ti.map_index }}]{% endif %} of {{ dag.dag_id }} failed, run {{ run_id }}, try {{ ti.try_number }}. "
    "Re-running is safe; the run's report and the task log say what was written."
)


def failure_notifiers(environ=os.environ) -> list:
    """The notifiers the site configured (none: an empty list). A notifier whose provider is not installed is said
    once in the log and left out: a DAG must still parse."""
    notifiers = []
    emails = [a.strip() for a in environ.get(EMAIL_ENV, "").split(",") if a.strip()]
    if emails:
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier
        except ImportError:
            log.warning("%s is set but apache-airflow-providers-smtp is not installed: no e-mail on failure", EMAIL_ENV)
        else:
            notifiers.append(
                SmtpNotifier(
                    to=emails, smtp_conn_id=environ.get(SMTP_CONN_ENV) or None, subject=SUBJECT, html_content=MESSAGE
                )
            )
    channel = environ.get(SLACK_CHANNEL_ENV, "").strip()
    if channel:
        try:
            from airflow.providers.slack.notifications.slack import SlackNotifier
        except ImportError:
            log.warning(
                "%s is set but apache-airflow-providers-slack is not installed: no Slack message on failure",
                SLACK_CHANNEL_ENV,
            )
        else:
            notifiers.append(
                SlackNotifier(
                    slack_conn_id=environ.get(SLACK_CONN_ENV) or "slack_api_default", channel=channel, text=MESSAGE
                )
            )
    return notifiers
