"""What a task process needs, imported once by Airflow's forkserver (`[core] mp_forkserver_preload`), not per task.

With `[scheduler] mp_start_method = forkserver`, the LocalExecutor's workers are forked from a server that imported
the modules this setting lists, and each task process is forked from a worker: it starts with the pipeline, pandas
and Great Expectations loaded instead of importing them (about 3 s of CPU per task on our machine;
docs/near-real-time.md). Importing this module does no I/O and starts no thread, so forking after it is safe."""

import great_expectations  # noqa: F401  (the bulk of the import time: scipy, altair, SQLAlchemy come with it)
from airflow.sdk.execution_time import supervisor, task_runner  # noqa: F401

import leukofhir.airflow.hook  # noqa: F401
import leukofhir.airflow.tasks  # noqa: F401
import leukofhir.evaluate.validate  # noqa: F401
import leukofhir.run  # noqa: F401
